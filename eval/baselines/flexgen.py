"""FlexGen baseline (``pip install flexgen``): CUDA only, OPT models only, tokenizer from the hub.

``run()`` shells out to ``python -m flexgen.flex_opt`` when CUDA and the package are present; otherwise it
returns a skip record with the reason. Nothing is emulated.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from typing import Any


def availability() -> str | None:
    """None if FlexGen can run here, else the reason it cannot."""
    import torch

    if not torch.cuda.is_available():
        return "skipped: needs CUDA (FlexGen runs OPT models on a GPU only)"
    if importlib.util.find_spec("flexgen") is None:
        return "skipped: flexgen not installed (pip install flexgen==0.1.8)"
    return None


def run(*, model: str = "facebook/opt-1.3b", prompt_len: int = 512, gen_len: int = 32, gpu_batch_size: int = 4,
        num_gpu_batches: int = 1, percent: tuple[int, ...] = (100, 0, 100, 0, 100, 0),
        timeout: float = 3600) -> dict[str, Any]:
    """Run FlexGen's own benchmark and parse its throughput line."""
    reason = availability()
    record: dict[str, Any] = {"baseline": "flexgen", "model": model, "prompt_len": prompt_len, "gen_len": gen_len,
                              "batch": gpu_batch_size * num_gpu_batches}
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", model, "--percent", *map(str, percent),
           "--gpu-batch-size", str(gpu_batch_size), "--num-gpu-batches", str(num_gpu_batches),
           "--prompt-len", str(prompt_len), "--gen-len", str(gen_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {**record, "status": "failed", "reason": f"flex_opt exited {proc.returncode}: {text[-500:]}"}
    found = {k: float(v) for k, v in re.findall(r"(prefill throughput|decode throughput|total throughput):\s*([\d.]+)", text)}
    return {**record, "status": "ok", "command": " ".join(cmd),
            "prefill_tok_s": found.get("prefill throughput"), "decode_tok_s": found.get("decode throughput"),
            "e2e_tok_s": found.get("total throughput")}
