"""Throughput and memory benchmark: H2O vs the full cache and the offloading baselines, in one run.

One measurement (``measure``): a batch of fixed-length prompts (real text from the Python reference,
``prompt_len`` tokens each, no padding), then exactly ``gen`` new tokens chosen greedily with EOS ignored, through
``h2o_cache.runner.timed_decode`` (prefill and decode timed separately). A warm-up precedes the repeats; medians
and min/max are reported. Per run: prefill tok/s (``batch*prompt_len / prefill s``), decode tok/s
(``batch*(gen-1) / decode s``), end-to-end tok/s (``batch*gen / total s``), peak memory (``eval/memory``), stored
KV bytes at the end, the budget as % of the prompt and as tokens, and each decode step as a fraction of the
machine's copy bandwidth (weights + stored KV bytes read per step / step time).

A run (``run_benchmark``) takes a ``ThroughputSpec``: the grid, the target configuration (``targets``, see
``throughput_report``), the same-memory comparison (``batch_search``) and the baseline systems
(``baselines/systems``). ``h2o-cache bench`` builds the spec from its options.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from h2o_cache.config import POLICIES
from h2o_cache.runner import kv_bytes, timed_decode

from .caches import FULL, TRANSFORMERS_CACHES, budget_tokens, make_cache
from .memory import (
    GiB,
    current_rss_bytes,
    machine_info,
    memory_bandwidth,
    peak_memory_bytes,
    reset_peak_memory,
    weight_bytes,
)
from .texts import prompt_batch

logger = logging.getLogger(__name__)

CACHES = ("h2o", FULL, *TRANSFORMERS_CACHES)
SYSTEMS = ("accelerate", "deepspeed", "flexgen", "flash2")


@dataclass
class ThroughputSpec:
    """What one ``h2o-cache bench`` run measures (the CLI's options, one field each)."""

    model: str | None = None
    dtype: str = "float32"
    prompt_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    batches: list[int] = field(default_factory=lambda: [1, 4])
    budgets: list[float] = field(default_factory=lambda: [0.2])
    caches: list[str] = field(default_factory=lambda: [FULL, "h2o", "offloaded", "quantized"])
    gen: int = 256
    warmup: int = 1
    repeats: int = 3
    targets: bool = True
    target_prompt: int = 4096
    target_batch: int = 4
    full_budget: float = 1.1
    same_memory_gib: float | None = 0.0
    max_batch: int = 64
    prefill_micro_batch: int = 0
    probe_steps: int = 2
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    baseline_prompt: int | None = None
    baseline_gen: int | None = None
    offload_fraction: float = 0.5
    bandwidth_mib: int = 256
    text_prompts: bool = True
    threads: int = 0
    out: str = "bench_out"
    no_progress: bool = False
    command: str = "h2o-cache bench"

    def __post_init__(self) -> None:
        bad = [c for c in self.caches if c not in CACHES]
        if bad:
            raise ValueError(f"caches: {bad} not supported; choose from {list(CACHES)}")
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad:
            raise ValueError(f"systems: {bad} not supported; choose from {list(SYSTEMS)}")
        if self.same_memory_gib is not None and self.same_memory_gib < 0:
            self.same_memory_gib = None  # negative: no same-memory comparison


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
    if cache in POLICIES:
        tokens = budget_tokens(0.2 if budget is None else budget, prompt_len)
        record.update(budget_pct=100.0 * tokens / prompt_len, budget_tokens=tokens)
    else:
        record.update(budget_pct=None, budget_tokens=None)
    if cache in TRANSFORMERS_CACHES:
        micro_batch = 0  # only those caches can be concatenated (h2o_cache.concatenate_caches)
        record["prefill_micro_batch"] = batch
    probe, reason = make_cache(cache, model, budget, prompt_len)
    if probe is None:
        return {**record, "status": "skipped", "reason": reason}
    del probe

    def new_cache(length: int = prompt_len) -> Any:
        return make_cache(cache, model, budget, length)[0]

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


def run_benchmark(args: ThroughputSpec, model: Any = None, tokenizer: Any = None,
                  model_path: Path | None = None) -> dict[str, Any]:
    """Run ``args`` (a ``ThroughputSpec``); a given ``model`` (and ``model_path``, its folder) replaces
    ``args.model``. Writes the reports into ``args.out`` and returns the results."""
    from tqdm.auto import tqdm

    from h2o_cache.models import cache_home, load_model

    from .baselines.systems import run_system
    from .batch_search import probe_peak, probe_peak_isolated, same_memory
    from .throughput_report import targets, write_reports

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
        spec = dict(cache=cache, batch=batch, prompt_len=args.target_prompt, gen=args.gen, budget=budget,
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
    if args.targets:  # the configuration the targets are read from, always included
        for cache, budget in ((FULL, None), ("h2o", 0.2), ("h2o", args.full_budget)):
            spec = (cache, args.target_batch, args.target_prompt, budget)
            if spec not in specs:
                specs.append(spec)
    results: dict[str, Any] = {
        "command": args.command,
        "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "roofline": bw,
        "weight_bytes": weight_bytes(model),
        "config": asdict(args),
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
        if budget_gib <= 0:  # auto: what the full cache needs at the target batch, probed the same way, +2%
            bar.set_postfix_str("same-memory budget probe")
            defining = probe(cache=FULL, batch=args.target_batch, budget=None)
            known[(FULL, args.target_batch)] = defining
            budget_gib = defining["peak_gib"] * 1.02
            budget_source = f"the full cache's probed peak at batch {args.target_batch}, +2%"
        results["same_memory"] = same_memory(
            model, budget_gib=budget_gib, prompt_len=args.target_prompt, gen=args.gen, h2o_budget=0.2,
            start_batch=args.target_batch, max_batch=args.max_batch, probe=probe, tokenizer=tok,
            measure_kwargs=mk, progress=bar.set_postfix_str, known=known)
        results["same_memory"]["budget_source"] = budget_source
        bar.update()
    for system in args.systems:
        bar.set_postfix_str(system)
        results["baselines"] += run_system(system, model_path, batch=args.target_batch, prompt_len=args.baseline_prompt
                                           or args.target_prompt, gen=args.baseline_gen or args.gen, tokenizer=tok,
                                           measure_kwargs=mk, budget=0.2, offload_fraction=args.offload_fraction)
        bar.update()
    bar.close()
    results["targets"] = targets(results) if args.targets else []
    results["machine"]["loadavg_end"] = machine_info()["loadavg"]
    results["outputs"] = {k: str(v) for k, v in write_reports(results, Path(args.out)).items()}
    return results
