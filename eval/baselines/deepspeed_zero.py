"""DeepSpeed ZeRO-Inference baseline: ZeRO stage 3 with ``offload_param`` (weights partitioned and offloaded,
gathered layer by layer at each forward), set up through ``HfDeepSpeedConfig`` + ``deepspeed.initialize``, as the
H2O paper benchmarked it. Runs on DeepSpeed's CPU accelerator when there is no GPU.

``load()`` raises ``BaselineUnavailable`` with the exact reason when DeepSpeed cannot be set up here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch


class BaselineUnavailable(RuntimeError):
    pass


def availability() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "skipped: deepspeed not installed (pip install wheel && pip install --no-build-isolation deepspeed)"
    return None


def ds_config(offload_device: str = "cpu") -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": offload_device, "pin_memory": torch.cuda.is_available()},
            "stage3_param_persistence_threshold": 0,
        },
        "wall_clock_breakdown": False,
    }


def load(model_path: str | Path, *, dtype: torch.dtype = torch.float32,
         attn_implementation: str = "sdpa") -> tuple[Any, dict[str, Any]]:
    reason = availability()
    if reason:
        raise BaselineUnavailable(reason)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    try:
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        config = ds_config()
        keep_alive = HfDeepSpeedConfig(config)  # must exist before from_pretrained (zero.Init)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation)
        engine = deepspeed.initialize(model=model, config_params=config)[0]
        engine.module.eval()
    except Exception as err:  # noqa: BLE001
        raise BaselineUnavailable(f"deepspeed ZeRO-3 setup failed: {type(err).__name__}: {str(err)[:300]}") from err
    from deepspeed.accelerator import get_accelerator

    info = {"accelerator": get_accelerator().device_name(), "zero_stage": 3, "offload_param": "cpu",
            "_keep_alive": keep_alive, "_engine": engine}
    return engine.module, info
