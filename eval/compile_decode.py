"""H2O decode step: torch.compile (inductor) vs uncompiled, side by side on one prefilled cache.

One prefill (batch of real-text prompts, ``prompt_len`` tokens each, no padding) fills an ``H2OCache``; each variant
decodes from its own deep copy of it, so both start from the same state and nobody pays the prefill twice. The
compiled variant is ``torch.compile(model.forward)`` (inductor by default); its first steps compile (and recompile
once when the step counter becomes dynamic) and are run as warm-up before timing. Then the two variants alternate
``--rounds`` times, ``--steps`` greedy decode steps each, and the median step time of each is reported, with the
ratio (uncompiled / compiled step time = compiled tok/s over uncompiled tok/s). Also printed: the largest logit
difference between the variants at the first decode step. ``--profile`` adds torch.profiler's top operators of one
step of each variant.

    python eval/compile_decode.py --batch 4 --prompt-len 4096 --budget 0.2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from h2o_cache import H2OCache
from h2o_cache.models import load_model

from .caches import h2o_config
from .texts import prompt_batch


def decode(forward, cache, token: torch.Tensor, start: int, steps: int) -> tuple[list[float], torch.Tensor]:
    """``steps`` greedy steps from position ``start``; per-step seconds and the first step's logits."""
    times, first = [], None
    batch = token.shape[0]
    for i in range(steps):
        pos = torch.tensor([start + i])
        t0 = time.perf_counter()
        logits = forward(input_ids=token, past_key_values=cache, cache_position=pos,
                         position_ids=pos.expand(batch, 1), use_cache=True).logits
        times.append(time.perf_counter() - t0)
        if first is None:
            first = logits.float().clone()
        token = logits[:, -1:].argmax(-1)
    return times, first


def profile_step(forward, cache, token, start, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(forward, cache, token, start, 1)
    print(f"\n--- profile: {label}, one decode step ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=0.2, help="total budget as a ratio of the prompt (half heavy)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="compiled steps run before timing (compilation)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    model, tokenizer = load_model()
    ids = prompt_batch(tokenizer, model.config.vocab_size, args.batch, args.prompt_len)
    cache = H2OCache(model.config, h2o_config(args.budget, args.prompt_len))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        token = out.logits[:, -1:].argmax(-1)
        print(f"prefill: batch {args.batch} x {args.prompt_len} tokens in {prefill_s:.1f} s; "
              f"budget {cache.budget()} tokens ({args.budget:.0%}), slots {cache.layers[0].keys.shape[-2]}")

        compiled = torch.compile(model.forward, backend=args.backend)
        start = args.prompt_len
        t0 = time.perf_counter()
        _, compiled_first = decode(compiled, copy.deepcopy(cache), token, start, args.warmup)
        print(f"compile + {args.warmup} warm-up steps: {time.perf_counter() - t0:.1f} s")
        _, eager_first = decode(model.forward, copy.deepcopy(cache), token, start, 1)
        print(f"first-step logits, compiled vs uncompiled: max |diff| = "
              f"{(compiled_first - eager_first).abs().max().item():.2e}")

        step_s = {"uncompiled": [], "compiled": []}
        for _ in range(args.rounds):
            for name, forward in (("uncompiled", model.forward), ("compiled", compiled)):
                times, _ = decode(forward, copy.deepcopy(cache), token, start, args.steps + 1)
                step_s[name] += times[1:]  # the first step of a copy touches cold memory
        med = {name: statistics.median(t) for name, t in step_s.items()}
        for name, s in med.items():
            print(f"{name:>10}: median step {s * 1e3:8.1f} ms  ({args.batch / s:7.1f} tok/s, "
                  f"min {min(step_s[name]) * 1e3:.1f} ms, max {max(step_s[name]) * 1e3:.1f} ms, n={len(step_s[name])})")
        print(f"compiled / uncompiled decode tok/s: {med['uncompiled'] / med['compiled']:.2f}x")

        if args.profile:
            profile_step(model.forward, copy.deepcopy(cache), token, start, "uncompiled")
            profile_step(compiled, copy.deepcopy(cache), token, start, "compiled")


if __name__ == "__main__":
    main()
