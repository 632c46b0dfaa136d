"""One ``h2o-cache bench`` run: a ``ThroughputSpec`` (the CLI only builds it) and ``run_benchmark``, which measures
the grid (``throughput.measure``), the target configuration and its acceptance targets (``throughput_report``),
the same-memory comparison (``batch_search``) and the baseline systems (``baselines/systems``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .baselines.systems import run_system
from .batch_search import probe_peak, probe_peak_isolated, same_memory
from .caches import FULL
from .memory import machine_info, memory_bandwidth, weight_bytes
from .throughput import CACHES, SYSTEMS, measure
from .throughput_report import targets, write_reports


@dataclass
class ThroughputSpec:
    """What one ``h2o-cache bench`` run measures (the CLI's options, one field each)."""

    model: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
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
    threads: int | None = None
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


def run_benchmark(args: ThroughputSpec, model: Any = None, tokenizer: Any = None,
                  model_path: Path | None = None) -> dict[str, Any]:
    """Run ``args`` (a ``ThroughputSpec``); a given ``model`` (and ``model_path``, its folder) replaces
    ``args.model``. Writes the reports into ``args.out`` and returns the results."""
    from tqdm.auto import tqdm

    from h2o_cache.models import cache_home, load_model


    if args.threads:
        torch.set_num_threads(args.threads)
    if model is None:
        model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                      device=args.device)
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
