"""Same-memory comparison: for a memory budget, the largest batch that fits for the full cache and for H2O,
and a measured run at each (the paper's throughput metric). Peaks are probed in a fresh process where the model
has a folder, since one long-lived process's allocator hides or inflates later peaks."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from h2o_cache.runner import kv_bytes, timed_decode

from .caches import FULL, make_cache
from .memory import GiB, peak_memory_bytes, reset_peak_memory
from .texts import prompt_batch
from .throughput import measure


def largest_batch(peak_of: Callable[[int], float], budget: float, start: int, max_batch: int) -> int:
    """Largest ``b <= max_batch`` whose measured ``peak_of(b)`` is within ``budget`` (0 if none is).

    A batch's peak memory is close to linear in the batch, and each probe costs a prefill of that whole batch, so
    the search fits a line through the probe at ``start`` and the probe farthest from it, jumps to where the line
    meets the budget, and refits after every probe. It ends only when a fitting batch and the batch after it
    (or ``max_batch``) have both been measured.
    """
    peaks: dict[int, float] = {}

    def fits(b: int) -> bool:
        if b not in peaks:
            peaks[b] = peak_of(b)
        return peaks[b] <= budget

    if not fits(start):
        b = start - 1
        while b > 0 and not fits(b):
            b -= 1
        return b
    lo, hi = start, max_batch + 1  # lo fits; hi is the smallest batch known not to (or past the cap)
    b = min(2 * start, max_batch)
    while lo < b < hi:  # every batch strictly between lo and hi is still unmeasured
        if fits(b):
            lo = b
        else:
            hi = b
        far = max(peaks, key=lambda k: abs(k - start))
        slope = (peaks[far] - peaks[start]) / (far - start) if far != start else 0.0
        guess = max_batch if slope <= 0 else start + int((budget - peaks[start]) / slope)
        b = min(max(guess, lo + 1), hi - 1)
    return lo


def probe_peak(model: Any, *, cache: str, batch: int, prompt_len: int, gen: int, budget: float | None,
               probe_steps: int, tokenizer: Any = None, micro_batch: int = 0) -> dict[str, Any]:
    """Measured peak of prefill + ``probe_steps`` decode steps, plus the KV the remaining steps would still add
    (the full cache grows by one token per step; H2O's slot buffer does not grow)."""
    device = next(model.parameters()).device
    ids = prompt_batch(tokenizer, model.config.vocab_size, batch, prompt_len).to(device)
    reset_peak_memory()
    res = timed_decode(model, ids, lambda: make_cache(cache, model, budget, prompt_len)[0], min(gen, probe_steps + 1),
                       micro_batch=micro_batch)
    peak = peak_memory_bytes(device) or 0
    kv_now = kv_bytes(res.cache) or 0
    seen = prompt_len + min(gen, probe_steps + 1) - 1
    growth = 0
    if cache == FULL and seen:
        growth = int(kv_now / seen * (prompt_len + gen - 1 - seen))
    del res
    gc.collect()
    return {"batch": batch, "measured_peak_gib": peak / GiB, "projected_growth_gib": growth / GiB,
            "peak_gib": (peak + growth) / GiB}


def probe_peak_isolated(model_path: Path, *, dtype: str, threads: int, text_prompts: bool,
                        **probe: Any) -> dict[str, Any]:
    """``probe_peak`` in a fresh Python process, whose peak RSS then belongs to this probe alone.

    In one long-lived process the allocator keeps memory freed by earlier runs, so later peaks come out hidden or
    inflated (one run here measured batch 6 below batch 4, and batch 7 above batch 8).
    """
    spec = {"model": str(model_path), "dtype": dtype, "threads": threads, "text_prompts": text_prompts,
            "probe": probe}
    code = "import json, sys; from h2o_cache.eval.batch_search import _probe_main; _probe_main(json.loads(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_main(spec: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    from h2o_cache.models import load_model, resolve_dtype

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["text_prompts"]:
        model, tokenizer = load_model(spec["model"], dtype=spec["dtype"])
    else:  # random token ids: the folder needs no tokenizer
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=resolve_dtype(spec["dtype"])).eval()
        tokenizer = None
    result = probe_peak(model, tokenizer=tokenizer, **spec["probe"])
    print(json.dumps(result))


def same_memory(model: Any, *, budget_gib: float, prompt_len: int, gen: int, h2o_budget: float, start_batch: int,
                max_batch: int, probe: Callable[..., dict[str, Any]], tokenizer: Any,
                measure_kwargs: dict[str, Any], progress: Callable[[str], None] = lambda s: None,
                known: dict[tuple[str, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Largest batch within ``budget_gib`` for the full cache and for H2O, and a measured run at each.

    ``probe(cache=..., batch=..., budget=...)`` returns a ``probe_peak`` record. ``known`` holds probes already
    made, by ``(cache, batch)``: when the budget was derived from a probe, that probe is reused rather than
    measured again: fresh processes' peaks differ by up to 17% here, so a second probe of the batch that
    defines the budget could land above it.
    """
    known = dict(known or {})
    out: dict[str, Any] = {"budget_gib": budget_gib, "prompt_len": prompt_len, "gen": gen, "probes": {}, "runs": {}}
    for cache in (FULL, "h2o"):
        probes = []

        def peak_of(b: int, cache=cache, probes=probes) -> float:
            progress(f"same-memory probe {cache} batch {b}")
            p = known.pop((cache, b), None)
            if p is None:
                p = probe(cache=cache, batch=b, budget=h2o_budget if cache == "h2o" else None)
            p["fits"] = p["peak_gib"] <= budget_gib
            probes.append(p)
            return p["peak_gib"]

        best = largest_batch(peak_of, budget_gib, start_batch, max_batch)
        out["probes"][cache] = probes
        out[f"{cache}_max_batch"] = best
        out[f"{cache}_hit_search_cap"] = best >= max_batch
        if best > 0:
            progress(f"same-memory run {cache} batch {best}")
            out["runs"][cache] = measure(model, cache=cache, batch=best, prompt_len=prompt_len, gen=gen,
                                         budget=h2o_budget if cache == "h2o" else None, tokenizer=tokenizer,
                                         **measure_kwargs)
    d, h = out["runs"].get(FULL), out["runs"].get("h2o")
    if d and h and d.get("status") == h.get("status") == "ok":
        out["e2e_ratio"] = h["e2e_tok_s"] / d["e2e_tok_s"]
        out["decode_ratio"] = h["decode_tok_s"] / d["decode_tok_s"]
    return out
