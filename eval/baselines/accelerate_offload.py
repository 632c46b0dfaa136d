"""HF Accelerate big-model inference baseline: the model loaded with a ``device_map`` that offloads layers.

On a GPU machine the meaningful setting is ``cpu`` offload (weights live in CPU RAM and are copied to the GPU at
every forward). On a CPU-only machine "cpu" offload is a no-op (the weights are already in RAM), so the meaningful
setting is **disk** offload: the chosen decoder layers' weights are written to ``offload_folder`` and memory-mapped
back at each forward (Accelerate's ``AlignDevicesHook``), which is what a model larger than RAM would do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch


def availability() -> str | None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return "skipped: accelerate not installed"
    return None


def device_map_for(config: Any, offload_fraction: float, target: str, main: str) -> dict[str, str]:
    """Every module on ``main`` except the last ``offload_fraction`` of the decoder layers, on ``target``."""
    n = config.num_hidden_layers
    first_offloaded = n - int(round(offload_fraction * n))
    dmap = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}
    for i in range(n):
        dmap[f"model.layers.{i}"] = target if i >= first_offloaded else main
    return dmap


def load(model_path: str | Path, *, dtype: torch.dtype = torch.float32, offload_fraction: float = 0.5,
         offload_folder: str | Path | None = None, attn_implementation: str = "sdpa") -> tuple[Any, dict[str, Any]]:
    """Load a saved model folder with part of its layers offloaded; returns ``(model, info)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    gpu = torch.cuda.is_available()
    main, target = ("cuda:0", "cpu") if gpu else ("cpu", "disk")
    folder = Path(offload_folder) if offload_folder else Path(tempfile.mkdtemp(prefix="h2o_accel_offload_"))
    dmap = device_map_for(config, offload_fraction, target, main)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=dmap,
                                                 offload_folder=str(folder), attn_implementation=attn_implementation)
    model.eval()
    offloaded = sum(1 for v in dmap.values() if v == target)
    info = {"offload_target": target, "offloaded_layers": offloaded, "offload_folder": str(folder)}
    return model, info
