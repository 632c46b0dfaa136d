"""Throughput and memory benchmark: H2O vs the full cache and the offloading baselines, in one run.

What one measurement is (``measure``): a batch of fixed-length prompts (real text from the Python reference,
``prompt_len`` tokens each, no padding), then exactly ``gen`` new tokens chosen greedily with EOS ignored. The loop
is the one ``generate`` runs (prefill forward with ``logits_to_keep=1``, then one forward per new token), written
out so that prefill and decode are timed separately. A warm-up precedes the repeats; medians and min/max are
reported. Per run: prefill tok/s (``batch*prompt_len / prefill s``), decode tok/s (``batch*(gen-1) / decode s``),
end-to-end tok/s (``batch*gen / total s``), peak process RSS (Linux: ``VmHWM``, reset per run by writing ``5`` to
``/proc/self/clear_refs``; ``torch.cuda.max_memory_allocated`` on GPU), stored KV bytes at the end, and the
budget as % of the prompt and as tokens.

Also:
- same-memory comparison (``same_memory``): for a memory budget in GiB, the largest batch whose measured peak fits,
  for the full cache and for H2O, and the throughput of each at its own largest batch (the paper's metric);
- roofline: a copy microbenchmark gives the machine's memory bandwidth; each decode step is reported as a fraction
  of it (weights + stored KV bytes read per step / step time);
- baselines (``eval/baselines``): transformers' offloaded and quantized caches, Accelerate layer offload,
  DeepSpeed ZeRO-Inference, FlexGen and FlashAttention-2 — each reported as skipped, with the reason, when it
  cannot run here.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from h2o_cache.compat import cache_kwargs

from .report import line_plot, markdown_table, write_json

logger = logging.getLogger(__name__)

GiB = 2**30
CACHES = ("h2o", "dynamic", "offloaded", "quantized")
SYSTEMS = ("accelerate", "deepspeed", "flexgen", "flash2")


# ---- memory -------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory() -> bool:
    """Free what can be freed and reset the peak counters; False when peak RSS cannot be reset here."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


# ---- roofline -----------------------------------------------------------------------------------------------
def memory_bandwidth(size_mib: int = 256, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """Copy microbenchmark: best of ``repeats`` ``dst.copy_(src)``; bandwidth counts bytes read + written."""
    n = size_mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"copy_mib": size_mib, "bandwidth_gb_s": 2 * n * 4 / best / 1e9, "best_copy_s": best}


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or p.device.type == "meta":
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


# ---- caches -------------------------------------------------------------------------------------------------
def h2o_budget_tokens(budget: float, prompt_len: int) -> tuple[int, int]:
    """``(heavy, recent)`` tokens for ``budget`` (a fraction of the prompt; > 1 keeps everything): half each."""
    tokens = max(2, int(round(budget * prompt_len)))
    heavy = tokens // 2
    return heavy, tokens - heavy


def make_cache(kind: str, model: Any, budget: float | None, prompt_len: int) -> tuple[Any | None, str | None]:
    if kind == "h2o":
        from h2o_cache import H2OCache

        heavy, recent = h2o_budget_tokens(budget if budget is not None else 0.2, prompt_len)
        return H2OCache(model.config, heavy_budget=heavy, recent_budget=recent), None
    from .baselines import transformers_caches

    return transformers_caches.make_cache(kind, model)


def cache_kv_bytes(cache: Any) -> int | None:
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total, found = 0, False
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "_quantized_keys"):
            return None  # quantized storage: backend-specific tensors, not counted (reported as unknown)
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                found = True
                total += t.numel() * t.element_size()
    return total if found else None


# ---- one measurement ----------------------------------------------------------------------------------------
def make_prompts(tokenizer: Any, vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """``[batch, prompt_len]`` token ids: real text when a tokenizer is given (a different offset per row)."""
    if tokenizer is not None:
        from h2o_cache.models import reference_text

        ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
        need = prompt_len * batch
        if ids.numel() < need:
            ids = ids.repeat(need // ids.numel() + 1)
        return ids[:need].view(batch, prompt_len).clone()
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=gen)


@torch.no_grad()
def _generate_timed(model: Any, ids: torch.Tensor, new_cache: Callable[[], Any], gen: int,
                    micro_batch: int = 0) -> dict[str, Any]:
    """Prefill (in micro-batches of ``micro_batch`` rows when > 0, see ``h2o_cache.batching``), then exactly
    ``gen`` greedy tokens."""
    from h2o_cache.batching import prefill_in_micro_batches

    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    cache, logits = prefill_in_micro_batches(model, ids, new_cache, micro_batch=micro_batch or ids.shape[0])
    nxt = logits.argmax(-1, keepdim=True)
    sync()
    t1 = time.perf_counter()
    steps = []
    for _ in range(gen - 1):  # EOS ignored: exactly `gen` new tokens
        s0 = time.perf_counter()
        out = model(input_ids=nxt, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        steps.append(time.perf_counter() - s0)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps, "cache": cache}


def measure(model: Any, *, cache: str, batch: int, prompt_len: int, gen: int, budget: float | None = None,
            tokenizer: Any = None, warmup: int = 1, repeats: int = 3, bandwidth_gb_s: float | None = None,
            system: str = "hf", extra: dict[str, Any] | None = None, micro_batch: int = 0) -> dict[str, Any]:
    """Measure one configuration; returns a result record (``status`` ok/skipped/failed).

    ``micro_batch`` > 0 prefills that many sequences at a time (``h2o_cache.batching``); the decode runs the whole
    batch at once either way.
    """
    device = next(p.device for p in model.parameters() if p.device.type != "meta") if any(
        p.device.type != "meta" for p in model.parameters()) else torch.device("cpu")
    record: dict[str, Any] = {"system": system, "cache": cache, "batch": batch, "prompt_len": prompt_len, "gen": gen,
                              "prefill_micro_batch": micro_batch or batch, **(extra or {})}
    if cache == "h2o":
        heavy, recent = h2o_budget_tokens(budget if budget is not None else 0.2, prompt_len)
        record.update(budget_pct=100.0 * (heavy + recent) / prompt_len, budget_tokens=heavy + recent)
    else:
        record.update(budget_pct=None, budget_tokens=None)
    if cache not in ("dynamic", "h2o"):
        micro_batch = 0  # only those caches can be concatenated (h2o_cache.concatenate_caches)
        record["prefill_micro_batch"] = batch
    probe, reason = make_cache(cache, model, budget, prompt_len)
    if probe is None:
        return {**record, "status": "skipped", "reason": reason}
    del probe
    ids = make_prompts(tokenizer, model.config.vocab_size, batch, prompt_len).to(device)
    try:
        for _ in range(warmup):  # short warm-up: same code paths, small shapes
            wl = min(prompt_len, 64)
            _generate_timed(model, ids[:, :wl], lambda wl=wl: make_cache(cache, model, budget, wl)[0], min(gen, 4),
                            micro_batch)
        runs = []
        for _ in range(repeats):
            can_reset = reset_peak_memory()
            rss0 = current_rss_bytes()
            result = _generate_timed(model, ids, lambda: make_cache(cache, model, budget, prompt_len)[0], gen,
                                     micro_batch)
            peak = peak_memory_bytes(device)
            kv = cache_kv_bytes(result["cache"])
            kept = result["cache"].tokens_kept() if hasattr(result["cache"], "tokens_kept") else None
            del result["cache"]
            runs.append({"prefill_s": result["prefill_s"], "decode_s": result["decode_s"],
                         "step_median_s": statistics.median(result["steps"]) if result["steps"] else None,
                         "peak_bytes": peak if (can_reset or device.type == "cuda") else None,
                         "rss_before_bytes": rss0, "kv_bytes": kv, "tokens_kept": kept})
            gc.collect()
    except Exception as err:  # noqa: BLE001 - a failing baseline is reported, not hidden
        logger.exception("run failed: %s", record)
        return {**record, "status": "failed", "reason": f"{type(err).__name__}: {str(err)[:300]}"}

    def med(key):
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None

    def spread(values):
        return [min(values), max(values)] if values else None

    prefill = [batch * prompt_len / r["prefill_s"] for r in runs]
    decode = [batch * (gen - 1) / r["decode_s"] for r in runs if gen > 1]
    e2e = [batch * gen / (r["prefill_s"] + r["decode_s"]) for r in runs]
    record.update(
        status="ok", repeats=repeats,
        prefill_s=med("prefill_s"), decode_s=med("decode_s"), step_s=med("step_median_s"),
        prefill_tok_s=statistics.median(prefill), prefill_tok_s_range=spread(prefill),
        decode_tok_s=statistics.median(decode) if decode else None, decode_tok_s_range=spread(decode),
        e2e_tok_s=statistics.median(e2e), e2e_tok_s_range=spread(e2e),
        peak_gib=None if med("peak_bytes") is None else med("peak_bytes") / GiB,
        kv_bytes=med("kv_bytes"), tokens_kept=med("tokens_kept"),
    )
    if record["kv_bytes"] is not None and record["step_s"]:
        wb = weight_bytes(model)
        bytes_per_step = wb + record["kv_bytes"]
        record["step_bytes"] = bytes_per_step
        record["step_gb_s"] = bytes_per_step / record["step_s"] / 1e9
        if bandwidth_gb_s:
            record["roofline_frac"] = record["step_gb_s"] / bandwidth_gb_s
    return record


# ---- same-memory comparison ---------------------------------------------------------------------------------
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
    ids = make_prompts(tokenizer, model.config.vocab_size, batch, prompt_len).to(device)
    reset_peak_memory()
    res = _generate_timed(model, ids, lambda: make_cache(cache, model, budget, prompt_len)[0],
                          min(gen, probe_steps + 1), micro_batch)
    peak = peak_memory_bytes(device) or 0
    kv_now = cache_kv_bytes(res["cache"]) or 0
    seen = prompt_len + min(gen, probe_steps + 1) - 1
    growth = 0
    if cache != "h2o" and seen:
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
    code = "import json, sys; from h2o_cache.eval.throughput import _probe_main; _probe_main(json.loads(sys.argv[1]))"
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
    for cache in ("dynamic", "h2o"):
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
    d, h = out["runs"].get("dynamic"), out["runs"].get("h2o")
    if d and h and d.get("status") == h.get("status") == "ok":
        out["e2e_ratio"] = h["e2e_tok_s"] / d["e2e_tok_s"]
        out["decode_ratio"] = h["decode_tok_s"] / d["decode_tok_s"]
    return out


# ---- baselines ----------------------------------------------------------------------------------------------
def run_system(system: str, model_path: Path | None, *, batch: int, prompt_len: int, gen: int, tokenizer: Any,
               measure_kwargs: dict[str, Any], budget: float, offload_fraction: float) -> list[dict[str, Any]]:
    base = {"system": system, "batch": batch, "prompt_len": prompt_len, "gen": gen}
    if system == "flexgen":
        from .baselines import flexgen

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
                        tokenizer=tokenizer, system="flash2", **measure_kwargs) for c in ("dynamic", "h2o")]
    if model_path is None:
        return [{**base, "cache": "dynamic", "status": "skipped", "reason": "needs a saved model folder"}]
    if system == "accelerate":
        from .baselines import accelerate_offload

        reason = accelerate_offload.availability()
        if reason:
            return [{**base, "cache": "dynamic", "status": "skipped", "reason": reason}]
        model, info = accelerate_offload.load(model_path, offload_fraction=offload_fraction)
        try:
            return [measure(model, cache="dynamic", batch=batch, prompt_len=prompt_len, gen=gen, tokenizer=tokenizer,
                            system=f"accelerate ({info['offload_target']} offload, {info['offloaded_layers']} layers)",
                            extra={"offload": info}, **measure_kwargs)]
        finally:
            del model
    if system == "deepspeed":
        from .baselines import deepspeed_zero

        try:
            model, info = deepspeed_zero.load(model_path)
        except deepspeed_zero.BaselineUnavailable as err:
            return [{**base, "cache": "dynamic", "status": "skipped", "reason": str(err)}]
        public = {k: v for k, v in info.items() if not k.startswith("_")}
        rec = measure(model, cache="dynamic", batch=batch, prompt_len=prompt_len, gen=gen, tokenizer=tokenizer,
                      system=f"deepspeed ZeRO-3 offload_param ({public['accelerator']})", extra={"deepspeed": public},
                      **measure_kwargs)
        # ZeRO-3 partitions the weights: they are gathered per layer, so count the model's full size.
        return [rec]
    raise ValueError(f"unknown system {system!r}")


# ---- reporting ----------------------------------------------------------------------------------------------
COLUMNS = ["system", "cache", "budget_pct", "budget_tokens", "batch", "prefill_micro_batch", "prompt_len", "gen",
           "prefill_tok_s",
           "decode_tok_s", "e2e_tok_s", "peak_gib", "kv_bytes", "step_s", "roofline_frac", "status", "reason"]


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars, from the grid's runs at the bars configuration."""
    cfg = results["config"]
    runs = [r for r in results["grid"] if r.get("status") == "ok" and r["system"] == "hf"
            and r["batch"] == cfg["bars_batch"] and r["prompt_len"] == cfg["bars_prompt"]]

    def find(cache, pct=None):
        for r in runs:
            if r["cache"] == cache and (pct is None or (r["budget_pct"] is not None and abs(r["budget_pct"] - pct) < 0.5)):
                return r
        return None

    dyn, h20 = find("dynamic"), find("h2o", 20.0)
    full = next((r for r in runs if r["cache"] == "h2o" and r["budget_pct"] and r["budget_pct"] >= 100.0), None)
    out = []

    def bar(name, value, target, ok):
        out.append({"bar": name, "value": value, "target": target, "met": None if value is None else ok(value)})

    ratio = lambda a, b, k: (a[k] / b[k]) if a and b and a.get(k) and b.get(k) else None  # noqa: E731
    bar("H2O 20% decode tok/s / DynamicCache", ratio(h20, dyn, "decode_tok_s"), ">= 2", lambda v: v >= 2)
    sm = results.get("same_memory") or {}
    bar("same memory: H2O e2e tok/s / full cache (each at its largest batch)", sm.get("e2e_ratio"), ">= 3",
        lambda v: v >= 3)
    bar("H2O 20% decode step / memory-bandwidth limit", h20.get("roofline_frac") if h20 else None, ">= 0.5",
        lambda v: v >= 0.5)
    bar("H2O budget>=length decode tok/s / DynamicCache", ratio(full, dyn, "decode_tok_s"), ">= 0.9",
        lambda v: v >= 0.9)
    bar("H2O prefill time (with scoring) / plain sdpa prefill", ratio(h20, dyn, "prefill_s"), "<= 1.25",
        lambda v: v <= 1.25)
    bar("H2O 20% peak memory / DynamicCache", ratio(h20, dyn, "peak_gib"), "<= 1.1", lambda v: v <= 1.1)
    bar("H2O 20% stored KV bytes / DynamicCache", ratio(h20, dyn, "kv_bytes"), "<= 0.21", lambda v: v <= 0.21)
    return out


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / "throughput.json", results)}
    rows = results["grid"] + results.get("baselines", [])
    md = [f"# Throughput benchmark\n\nMachine: {results['machine']['description']}  \n"
          f"Command: `{results['command']}`  \nMemory bandwidth (copy): "
          f"{results['roofline']['bandwidth_gb_s']:.2f} GB/s\n",
          "## Runs\n", markdown_table(rows, COLUMNS, floatfmt=".3g")]
    if results.get("bars"):
        md += ["\n## Bars\n", markdown_table(results["bars"], ["bar", "value", "target", "met"], floatfmt=".3f")]
    sm = results.get("same_memory")
    if sm:
        md.append(f"\n## Same memory budget: {sm['budget_gib']:.3f} GiB (prompt {sm['prompt_len']}, gen {sm['gen']})\n")
        md.append(f"Budget: {sm.get('budget_source', 'given')}. Peaks probed in a fresh process per probe where the "
                  "model has a folder.\n\n")
        md.append(f"Largest batch: full cache {sm.get('dynamic_max_batch')}, H2O {sm.get('h2o_max_batch')}"
                  f"{' (search cap reached)' if sm.get('h2o_hit_search_cap') else ''}; "
                  f"e2e ratio {sm.get('e2e_ratio', float('nan')):.2f}, decode ratio "
                  f"{sm.get('decode_ratio', float('nan')):.2f}\n\n")
        probes = [{"cache": c, **p} for c, ps in sm["probes"].items() for p in ps]
        md.append(markdown_table(probes, ["cache", "batch", "measured_peak_gib", "projected_growth_gib", "peak_gib",
                                          "fits"], floatfmt=".3f"))
        md.append("\n" + markdown_table(list(sm["runs"].values()), COLUMNS, floatfmt=".3g"))
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        md += ["\n## Skipped / failed\n", markdown_table(skipped, ["system", "cache", "status", "reason"])]
    paths["markdown"] = out_dir / "throughput.md"
    paths["markdown"].write_text("\n".join(md))
    plots = _plots(results, out_dir)
    paths.update(plots)
    return paths


def _plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    ok = [r for r in results["grid"] if r.get("status") == "ok" and r["system"] == "hf"]
    out = {}
    batch0 = results["config"]["bars_batch"]
    series: dict[str, tuple[list, list]] = {}
    for r in sorted((r for r in ok if r["batch"] == batch0), key=lambda r: r["prompt_len"]):
        name = r["cache"] if r["budget_pct"] is None else f"h2o {r['budget_pct']:.0f}%"
        xs, ys = series.setdefault(name, ([], []))
        xs.append(r["prompt_len"])
        ys.append(r["decode_tok_s"])
    if series:
        p = line_plot(out_dir / "tok_s_vs_context.png", series, title=f"decode tok/s vs context (batch {batch0})",
                      xlabel="prompt length (tokens)", ylabel="decode tok/s")
        if p:
            out["plot_context"] = p
    sm = results.get("same_memory")
    if sm:
        series = {}
        for cache, probes in sm["probes"].items():
            pts = sorted((p["batch"], p["peak_gib"]) for p in probes)
            series[f"{cache} peak GiB"] = ([b for b, _ in pts], [g for _, g in pts])
        p = line_plot(out_dir / "memory_vs_batch.png", series, title="peak memory vs batch",
                      xlabel="batch", ylabel="peak GiB", hlines={"budget": sm["budget_gib"]})
        if p:
            out["plot_memory"] = p
        series = {}
        for r in [*ok, *sm["runs"].values()]:
            if r.get("status") != "ok" or r["prompt_len"] != sm["prompt_len"]:
                continue
            if r["cache"] == "h2o" and (r["budget_pct"] is None or r["budget_pct"] >= 100):
                continue
            name = r["cache"]
            xs, ys = series.setdefault(name, ([], []))
            if r["batch"] not in xs:
                xs.append(r["batch"])
                ys.append(r["e2e_tok_s"])
        for name, (xs, ys) in series.items():
            order = sorted(range(len(xs)), key=xs.__getitem__)
            series[name] = ([xs[i] for i in order], [ys[i] for i in order])
        p = line_plot(out_dir / "tok_s_vs_batch.png", series,
                      title=f"e2e tok/s vs batch (max batch within {sm['budget_gib']:.2f} GiB marked by search)",
                      xlabel="batch", ylabel="end-to-end tok/s")
        if p:
            out["plot_batch"] = p
    return out


# ---- driver -------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = os.cpu_count()
    desc = f"{cores}-core CPU ({platform.processor() or platform.machine()}), " + (f"GPU {gpu}" if gpu else "no GPU")
    return {"description": desc, "cpu_count": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run_benchmark(args: argparse.Namespace, model: Any = None, tokenizer: Any = None,
                  model_path: Path | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from h2o_cache.models import cache_home, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if model is None:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        model_path = Path(args.model) if args.model else cache_home() / "smollm2-135m"
        if model_path.suffix == ".gguf":
            model_path = None
    bw = memory_bandwidth(args.bandwidth_mib)
    mk = {"warmup": args.warmup, "repeats": args.repeats, "bandwidth_gb_s": bw["bandwidth_gb_s"],
          "micro_batch": args.prefill_micro_batch}
    tok = tokenizer if args.text_prompts else None

    def probe(*, cache: str, batch: int, budget: float | None) -> dict[str, Any]:
        spec = dict(cache=cache, batch=batch, prompt_len=args.bars_prompt, gen=args.gen, budget=budget,
                    probe_steps=args.probe_steps, micro_batch=args.prefill_micro_batch)
        if model_path is not None and (Path(model_path) / "config.json").exists():
            return probe_peak_isolated(Path(model_path), dtype=args.dtype, threads=args.threads,
                                       text_prompts=args.text_prompts, **spec)
        return probe_peak(model, tokenizer=tok, **spec)  # a model without a folder: probed in this process

    specs = []
    for L in args.prompt_lens:
        for B in args.batches:
            for cache in args.caches:
                for budget in (args.budgets if cache == "h2o" else [None]):
                    specs.append((cache, B, L, budget))
    if args.bars:  # the configuration the bars are read from, always included
        for cache, budget in (("dynamic", None), ("h2o", 0.2), ("h2o", args.full_budget)):
            spec = (cache, args.bars_batch, args.bars_prompt, budget)
            if spec not in specs:
                specs.append(spec)
    results: dict[str, Any] = {
        "command": "h2o-cache bench " + " ".join(getattr(args, "_argv", []) or []),
        "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "roofline": bw,
        "weight_bytes": weight_bytes(model),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
        "grid": [], "baselines": [],
    }
    bar = tqdm(total=len(specs) + (1 if args.same_memory_gib is not None else 0) + len(args.systems),
               desc="bench", disable=args.no_progress)
    for cache, B, L, budget in specs:
        bar.set_postfix_str(f"{cache} b={B} L={L} budget={budget}")
        results["grid"].append(measure(model, cache=cache, batch=B, prompt_len=L, gen=args.gen, budget=budget,
                                       tokenizer=tok, **mk))
        bar.update()
    if args.same_memory_gib is not None:
        budget_gib = args.same_memory_gib
        budget_source = f"--same-memory-gib {budget_gib}"
        known = {}
        if budget_gib <= 0:  # auto: what the full cache needs at the bars batch, probed the same way, +2%
            bar.set_postfix_str("same-memory budget probe")
            defining = probe(cache="dynamic", batch=args.bars_batch, budget=None)
            known[("dynamic", args.bars_batch)] = defining
            budget_gib = defining["peak_gib"] * 1.02
            budget_source = f"the full cache's probed peak at batch {args.bars_batch}, +2%"
        results["same_memory"] = same_memory(
            model, budget_gib=budget_gib, prompt_len=args.bars_prompt, gen=args.gen, h2o_budget=0.2,
            start_batch=args.bars_batch, max_batch=args.max_batch, probe=probe, tokenizer=tok,
            measure_kwargs=mk, progress=bar.set_postfix_str, known=known)
        results["same_memory"]["budget_source"] = budget_source
        bar.update()
    for system in args.systems:
        bar.set_postfix_str(system)
        results["baselines"] += run_system(system, model_path, batch=args.bars_batch, prompt_len=args.baseline_prompt
                                           or args.bars_prompt, gen=args.baseline_gen or args.gen, tokenizer=tok,
                                           measure_kwargs=mk, budget=0.2, offload_fraction=args.offload_fraction)
        bar.update()
    bar.close()
    results["bars"] = bars(results) if args.bars else []
    results["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["outputs"] = {k: str(v) for k, v in write_reports(results, Path(args.out)).items()}
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        bad = [x for x in names if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return names

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="saved model folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16 (default float32)")
    p.add_argument("--prompt-lens", type=_ints, default=[512, 1024, 2048, 4096],
                   help="comma-separated prompt lengths of the grid (default 512,1024,2048,4096)")
    p.add_argument("--batches", type=_ints, default=[1, 4], help="comma-separated batch sizes of the grid")
    p.add_argument("--budgets", type=_floats, default=[0.2],
                   help="comma-separated H2O budgets as fractions of the prompt (half heavy, half recent); "
                        "> 1 keeps every token (default 0.2)")
    p.add_argument("--caches", type=_names(CACHES), default=["dynamic", "h2o", "offloaded", "quantized"],
                   help=f"comma-separated caches of the grid, from {list(CACHES)}")
    p.add_argument("--gen", type=int, default=256, help="new tokens per sequence, exactly (EOS ignored)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs (small shapes) before each configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    p.add_argument("--bars", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the issue's bar configuration (dynamic, H2O 20%%, H2O full) and evaluate the bars")
    p.add_argument("--bars-prompt", type=int, default=4096, help="prompt length of the bar configuration")
    p.add_argument("--bars-batch", type=int, default=4, help="batch of the bar configuration")
    p.add_argument("--full-budget", type=float, default=1.1,
                   help="H2O budget (fraction of prompt) used as 'budget >= length' (default 1.1: no eviction)")
    p.add_argument("--same-memory-gib", type=float, default=0.0,
                   help="memory budget (GiB) of the same-memory comparison; 0 = the full cache's measured peak at "
                        "the bar configuration (+2%%); negative disables it")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the same-memory search tries")
    p.add_argument("--prefill-micro-batch", type=int, default=0,
                   help="prefill this many sequences at a time and decode the whole batch together (FlexGen's "
                        "schedule; h2o_cache.prefill_in_micro_batches), for the full and the H2O cache alike; "
                        "0 = the whole batch at once (default)")
    p.add_argument("--probe-steps", type=int, default=2,
                   help="decode steps of a memory probe; the full cache's growth over the remaining steps is added")
    p.add_argument("--systems", type=_names(SYSTEMS), default=list(SYSTEMS),
                   help=f"comma-separated baseline systems, from {list(SYSTEMS)} (empty string: none)")
    p.add_argument("--baseline-prompt", type=int, default=None,
                   help="prompt length of the baseline systems (default: --bars-prompt)")
    p.add_argument("--baseline-gen", type=int, default=None, help="new tokens of the baseline systems (default --gen)")
    p.add_argument("--offload-fraction", type=float, default=0.5,
                   help="fraction of decoder layers Accelerate offloads (to disk on CPU, to CPU RAM on GPU)")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="buffer size of the copy microbenchmark")
    p.add_argument("--text-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="prompts from real text (the Python reference); --no-text-prompts uses random ids")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="bench_out", help="output folder for throughput.json/.md and the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_cli(args: argparse.Namespace) -> int:
    if not getattr(args, "_argv", None) and "bench" in sys.argv:  # `h2o-cache bench ...`: record its options
        args._argv = sys.argv[sys.argv.index("bench") + 1:]
    if args.same_memory_gib is not None and args.same_memory_gib < 0:
        args.same_memory_gib = None
    results = run_benchmark(args)
    print(Path(results["outputs"]["markdown"]).read_text())
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``h2o-cache``'s subparsers."""
    p = subparsers.add_parser("bench", help="throughput/memory benchmark: H2O vs full cache and baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run_cli)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h2o_cache.eval.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.WARNING)
    return _run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
