"""Throughput and memory benchmark: H2O vs the full cache and the offloading baselines, in one run.

One measurement (``measure``): a batch of fixed-length prompts (real text from the Python reference,
``prompt_len`` tokens each, no padding), then exactly ``gen`` new tokens chosen greedily with EOS ignored, through
``h2o_cache.runner.timed_decode`` (prefill and decode timed separately). A warm-up precedes the repeats; medians
and min/max are reported. Per run: prefill tok/s (``batch*prompt_len / prefill s``), decode tok/s
(``batch*(gen-1) / decode s``), end-to-end tok/s (``batch*gen / total s``), peak memory (``eval/memory``), stored
KV bytes at the end, the budget as % of the prompt and as tokens, and each decode step as a fraction of the
machine's copy bandwidth (weights + stored KV bytes read per step / step time).

A whole run (the grid, the targets, the same-memory comparison, the baselines) is ``eval/bench.py``.
"""

from __future__ import annotations

import gc
import logging
import statistics
from typing import Any

import torch

from h2o_cache.config import POLICIES
from h2o_cache.runner import kv_bytes, timed_decode

from .caches import FULL, TRANSFORMERS_CACHES, budget_tokens, make_cache
from .memory import (
    GiB,
    current_rss_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    weight_bytes,
)
from .texts import prompt_batch

logger = logging.getLogger(__name__)

CACHES = ("h2o", FULL, *TRANSFORMERS_CACHES)
SYSTEMS = ("accelerate", "deepspeed", "flexgen", "flash2")


def measure(model: Any, *, cache: str, batch: int, prompt_len: int, gen: int, budget: float | None = None,
            tokenizer: Any = None, warmup: int = 1, repeats: int = 3, bandwidth_gb_s: float | None = None,
            system: str = "hf", extra: dict[str, Any] | None = None, micro_batch: int = 0,
            options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure one configuration; returns a result record (``status`` ok/skipped/failed).

    ``options`` go to the cache factory (``eval.caches.make_cache``: ``H2OConfig`` fields such as ``kv_bits``, or
    a transformers cache's own).

    ``micro_batch`` > 0 prefills that many sequences at a time (``h2o_cache.batching``); the decode runs the whole
    batch at once either way.
    """
    device = next(p.device for p in model.parameters() if p.device.type != "meta") if any(
        p.device.type != "meta" for p in model.parameters()) else torch.device("cpu")
    record: dict[str, Any] = {"system": system, "cache": cache, "batch": batch, "prompt_len": prompt_len, "gen": gen,
                              "prefill_micro_batch": micro_batch or batch, **(extra or {})}
    if cache in POLICIES:
        tokens = budget_tokens(0.2 if budget is None else budget, prompt_len)
        record.update(budget_pct=100.0 * tokens / prompt_len, budget_tokens=tokens)
    else:
        record.update(budget_pct=None, budget_tokens=None)
    if cache in TRANSFORMERS_CACHES:
        micro_batch = 0  # only those caches can be concatenated (h2o_cache.concatenate_caches)
        record["prefill_micro_batch"] = batch
    options = dict(options or {})
    probe, reason = make_cache(cache, model, budget, prompt_len, **options)
    if probe is None:
        return {**record, "status": "skipped", "reason": reason}
    del probe

    def new_cache(length: int = prompt_len) -> Any:
        return make_cache(cache, model, budget, length, **options)[0]

    ids = prompt_batch(tokenizer, model.config.vocab_size, batch, prompt_len).to(device)
    try:
        for _ in range(warmup):  # short warm-up: same code paths, small shapes
            wl = min(prompt_len, 64)
            timed_decode(model, ids[:, :wl], lambda wl=wl: new_cache(wl), min(gen, 4), micro_batch=micro_batch)
        runs = []
        for _ in range(repeats):
            can_reset = reset_peak_memory()
            rss0 = current_rss_bytes()
            result = timed_decode(model, ids, new_cache, gen, micro_batch=micro_batch)
            peak = peak_memory_bytes(device)
            kv = kv_bytes(result.cache)
            kept = result.cache.tokens_kept() if hasattr(result.cache, "tokens_kept") else None
            del result.cache
            runs.append({"prefill_s": result.prefill_s, "decode_s": result.decode_s,
                         "step_median_s": statistics.median(result.step_s) if result.step_s else None,
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
