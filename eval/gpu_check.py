"""Decode speed of a Llama-3-8B-shaped model on one GPU: the benchmark half of ``make gpu-check``.

A random-weight ``LlamaForCausalLM`` with Llama-3-8B's real configuration in bfloat16 is prefilled with random
tokens to each context length (16k and 32k by default), then decodes ``--steps`` tokens one at a time, timed
after ``--warmup`` steps. Systems: full (DynamicCache, sdpa, which on CUDA dispatches to its FlashAttention-2 kernel),
StaticCache with ``torch.compile(mode="reduce-overhead")``, and an H2OCache at a 20% budget through the torch
path, the fused Triton kernel (``h2o_cache.kernels``), and the torch path under ``torch.compile``.

Per row: decode tok/s, peak allocated GPU memory (prefill and decode), and the fraction of the measured copy
bandwidth reached, counting the bytes a step must read (weights except the input embedding, plus the stored K/V).
Random weights decode as fast as trained ones: the work per token does not depend on their values.

Without CUDA it prints ``skipped: needs CUDA`` and exits 0. ``--cpu-smoke`` runs the same code on CPU with a tiny
configuration (a test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from h2o_cache.compat import cache_kwargs
from h2o_cache.runner import kv_bytes

from .caches import h2o_config
from .memory import memory_bandwidth, weight_bytes

# meta-llama/Meta-Llama-3-8B config.json
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=32768 + 1024, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=1024, rope_theta=500000.0, tie_word_embeddings=False,
)
SYSTEMS = ("full", "static+compile", "h2o-torch", "h2o-fused", "h2o-compiled")
# A failure here is the project's bug; a compiled H2O step that does not compile is reported without failing
# the check (the decode step is being made traceable separately).
OPTIONAL = ("h2o-compiled",)


def build_model(config_kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_cache(system: str, model: Any, context: int, total: int, budget: float) -> Any:
    from transformers import DynamicCache, StaticCache

    if system == "full":
        return DynamicCache(config=model.config)
    if system == "static+compile":
        return StaticCache(config=model.config, max_cache_len=total)
    from h2o_cache import H2OCache

    return H2OCache(model.config, h2o_config(budget, context))


def decode_run(model: Any, system: str, context: int, *, steps: int, warmup: int, budget: float) -> dict[str, Any]:
    """Prefill ``context`` random tokens, then time ``steps`` single-token decode steps of ``system``."""
    import h2o_cache
    from h2o_cache.kernels import decode

    device = next(model.parameters()).device
    # The baselines run transformers as it is, without the plugin's attention patches.
    if system.startswith("h2o"):
        h2o_cache.enable()
    else:
        h2o_cache.disable()
    decode.set_fused_decode(system == "h2o-fused")
    if system == "h2o-fused" and not (device.type == "cuda" and decode.fused_decode_available()):
        return {"skipped": "fused kernel needs CUDA and triton"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    cache = _new_cache(system, model, context, context + warmup + steps + 1, budget)
    forward: Callable[..., Any] = model
    if system == "static+compile":
        forward = torch.compile(model, mode="reduce-overhead")
    elif system == "h2o-compiled":
        forward = torch.compile(model)
    breaks_before = _graph_breaks()

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        del out
        position = context
        elapsed = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            pos = torch.tensor([[position]], device=device)
            logits = forward(input_ids=tok, position_ids=pos, use_cache=True, **cache_kwargs(cache)).logits
            tok = logits[:, -1:].argmax(-1)
            position += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
    embed = model.get_input_embeddings().weight
    step_bytes = weight_bytes(model) - embed.numel() * embed.element_size() + (kv_bytes(cache) or 0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    decode.set_fused_decode(True)
    h2o_cache.enable()
    del cache
    return {
        "tok_s": steps / elapsed, "step_ms": 1e3 * elapsed / steps, "prefill_s": prefill_s,
        "peak_gib": None if peak is None else peak / 2**30, "step_gb": step_bytes / 1e9,
        "graph_breaks": _graph_breaks() - breaks_before if forward is not model else None,
    }


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    dtype = torch.bfloat16
    config = TINY if args.cpu_smoke else LLAMA3_8B
    t_start = time.perf_counter()
    model = build_model(config, device, dtype)
    bandwidth = None
    if device.type == "cuda":
        bandwidth = memory_bandwidth(size_mib=2048, repeats=10, device="cuda")["bandwidth_gb_s"]
        print(f"device: {torch.cuda.get_device_name(device)}; measured copy bandwidth {bandwidth:.0f} GB/s "
              "(read + write, best of 10 copies of 2 GiB)")
    print(f"model: random-weight Llama-3-8B config ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)"
          if not args.cpu_smoke else "model: tiny random Llama (CPU smoke run, not a measurement)")
    print(f"dtype bfloat16, batch 1, prefill of random tokens then {args.steps} timed decode steps after "
          f"{args.warmup} warm-up steps; H2O budget {args.budget:.0%} of the context (half heavy, half recent)")
    print("baselines run with h2o_cache's patches reverted; graph breaks: dynamo's count while compiling that row")
    print("HBM fraction = (weights except input embedding + stored K/V) per step x steps/s / copy bandwidth")
    header = f"{'context':>8} {'system':<16} {'tok/s':>8} {'ms/step':>8} {'peak GiB':>9} {'GB/step':>8} {'HBM %':>6} {'graph breaks':>12}"
    print(header)
    print("-" * len(header))
    failures = []
    for context in args.contexts:
        for system in args.systems:
            try:
                row = decode_run(model, system, context, steps=args.steps, warmup=args.warmup, budget=args.budget)
            except Exception as err:  # noqa: BLE001 - one system's failure is reported, the others still run
                row = {"failed": f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"}
            if "tok_s" not in row:
                reason = row.get("skipped") or row["failed"]
                print(f"{context:>8} {system:<16} {'skipped' if 'skipped' in row else 'FAILED'}: {reason}")
                if "failed" in row and system not in OPTIONAL:
                    failures.append((context, system))
                continue
            frac = "" if bandwidth is None else f"{100 * row['step_gb'] * row['tok_s'] / bandwidth:6.1f}"
            peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:9.2f}"
            print(f"{context:>8} {system:<16} {row['tok_s']:8.1f} {row['step_ms']:8.2f} {peak:>9} "
                  f"{row['step_gb']:8.4g} {frac:>6} {'' if row['graph_breaks'] is None else row['graph_breaks']:>12}",
                  flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if failures:
        print(f"failed: {failures}")
        return 1
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _systems(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in SYSTEMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown system(s) {bad}; choose from {', '.join(SYSTEMS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=_ints, default=[16384, 32768], help="context lengths (comma-separated)")
    p.add_argument("--systems", type=_systems, default=list(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (compilation happens there)")
    p.add_argument("--budget", type=float, default=0.2, help="H2O budget as a fraction of the context")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or not 0 < args.budget <= 1:
        p.error("--steps must be >= 1, --warmup >= 0, --budget in (0, 1]")
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("skipped: needs CUDA")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
