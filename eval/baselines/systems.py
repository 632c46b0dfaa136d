"""The offloading systems the throughput benchmark compares H2O with, each run at the target configuration and
reported as skipped (with the reason) when it cannot run here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..caches import FULL
from ..throughput import measure


def run_system(system: str, model_path: Path | None, *, batch: int, prompt_len: int, gen: int, tokenizer: Any,
               measure_kwargs: dict[str, Any], budget: float, offload_fraction: float) -> list[dict[str, Any]]:
    base = {"system": system, "batch": batch, "prompt_len": prompt_len, "gen": gen}
    if system == "flexgen":
        from . import flexgen

        return [flexgen.run(prompt_len=prompt_len, gen_len=gen, gpu_batch_size=batch)]
    if system == "flash2":
        import importlib.util

        if not torch.cuda.is_available():
            return [{**base, "cache": "h2o", "status": "skipped", "reason": "skipped: needs CUDA (FlashAttention-2)"}]
        if importlib.util.find_spec("flash_attn") is None:
            return [{**base, "cache": "h2o", "status": "skipped", "reason": "skipped: flash-attn not installed"}]
        from h2o_cache.models import load_model

        model, _ = load_model(model_path, attn_implementation="flash_attention_2", device="cuda", dtype="float16")
        return [measure(model, cache=c, batch=batch, prompt_len=prompt_len, gen=gen, budget=budget,
                        tokenizer=tokenizer, system="flash2", **measure_kwargs) for c in (FULL, "h2o")]
    if model_path is None:
        return [{**base, "cache": FULL, "status": "skipped", "reason": "needs a saved model folder"}]
    if system == "accelerate":
        from . import accelerate_offload

        reason = accelerate_offload.availability()
        if reason:
            return [{**base, "cache": FULL, "status": "skipped", "reason": reason}]
        model, info = accelerate_offload.load(model_path, offload_fraction=offload_fraction)
        try:
            return [measure(model, cache=FULL, batch=batch, prompt_len=prompt_len, gen=gen, tokenizer=tokenizer,
                            system=f"accelerate ({info['offload_target']} offload, {info['offloaded_layers']} layers)",
                            extra={"offload": info}, **measure_kwargs)]
        finally:
            del model
    if system == "deepspeed":
        from . import deepspeed_zero

        try:
            model, info = deepspeed_zero.load(model_path)
        except deepspeed_zero.BaselineUnavailable as err:
            return [{**base, "cache": FULL, "status": "skipped", "reason": str(err)}]
        public = {k: v for k, v in info.items() if not k.startswith("_")}
        rec = measure(model, cache=FULL, batch=batch, prompt_len=prompt_len, gen=gen, tokenizer=tokenizer,
                      system=f"deepspeed ZeRO-3 offload_param ({public['accelerator']})", extra={"deepspeed": public},
                      **measure_kwargs)
        # ZeRO-3 partitions the weights: they are gathered per layer, so count the model's full size.
        return [rec]
    raise ValueError(f"unknown system {system!r}")
