"""The quality-per-byte frontier (``h2o-cache eval --frontier``): quality against the share of KV bytes.

Every configuration is a named spec ``FAMILY[@BUDGET][+intBITS]``, read through one registry (``FAMILIES``):

- ``full``: transformers' ``DynamicCache`` (every token, model dtype);
- an evicting ``H2OCache`` policy (``h2o``, ``local``, ``streaming``, ``random``, ``h2o_no_recent``) at a budget
  (fraction of the prompt, as everywhere in ``eval``), stored in the model's dtype or quantised by
  ``H2OConfig.kv_bits``: ``h2o@0.2``, ``h2o@0.64+int4``;
- ``keep_all+intB``: our quantisation alone (``H2OCache(policy="keep_all", kv_bits=B)``, no eviction);
- ``quanto+intB`` / ``hqq+intB``: transformers' ``QuantizedCache`` with that backend.

The x axis of every row is ``byte_share``: the bytes the cache measurably held (``h2o_cache.runner.kv_bytes``:
codes, scales, zero points, residual, scores, positions, validity) over what an uncompressed fp16 cache holds for
the same tokens (``h2o_cache.runner.fp16_kv_bytes``). Perplexity and retrieval measure it on their own caches;
lm-eval on the caches of its loglikelihood requests. A line of the plot is a spec's ``method`` (the spec without
its budget for evicting policies, without its bits for quantisation alone).
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from h2o_cache.config import KV_BITS

from .caches import FULL
from .perplexity import run_perplexity
from .retrieval import run_retrieval
from .texts import load_text

TASKS = ("perplexity", "retrieval", "lm_eval")
EVICTING = ("h2o", "h2o_no_recent", "local", "streaming", "random")
# "The best H2O configuration" of the bars: H2O at any budget and bits, and our quantisation alone.
OURS = ("h2o", "keep_all")


@dataclass(frozen=True)
class Family:
    """How one kind of spec becomes a cache: the ``eval.caches`` name, whether it takes a budget, the bits it
    accepts (``None``: unquantised) and the cache options for given bits."""

    cache: str
    budget: bool
    bits: tuple[int | None, ...]
    options: Callable[[int | None], dict[str, Any]]
    ours: bool  # an H2OCache: takes the H2O options and runs through H2OLM (lm-eval)


def _h2o_bits(bits: int | None) -> dict[str, Any]:
    return {} if bits is None else {"kv_bits": bits}


def _quantized(backend: str) -> Callable[[int | None], dict[str, Any]]:
    return lambda bits: {"backend": backend, "nbits": bits}


FAMILIES: dict[str, Family] = {
    FULL: Family(FULL, False, (None,), lambda bits: {}, True),
    **{p: Family(p, True, (None, *KV_BITS), _h2o_bits, True) for p in EVICTING},
    "keep_all": Family("keep_all", False, KV_BITS, _h2o_bits, True),
    # The bit widths each backend's QuantizedCache accepts.
    "quanto": Family("quantized", False, (2, 4), _quantized("quanto"), False),
    "hqq": Family("quantized", False, (1, 2, 3, 4, 8), _quantized("hqq"), False),
}

_SPEC = re.compile(r"^(?P<family>[a-z0-9_]+)(?:@(?P<budget>[0-9.]+))?(?:\+int(?P<bits>[0-9]+))?$")


@dataclass(frozen=True)
class FrontierSpec:
    """One configuration of the frontier (see the module docstring for the names)."""

    name: str
    family: str
    budget: float | None
    bits: int | None

    @property
    def method(self) -> str:
        """The plot line this spec belongs to."""
        if FAMILIES[self.family].budget:
            return self.family + (f"+int{self.bits}" if self.bits else "")
        return self.family if self.family == FULL else f"{self.family} (quantisation only)"

    @property
    def cache(self) -> str:
        return FAMILIES[self.family].cache

    def options(self, h2o_options: dict[str, Any], quantized_options: dict[str, Any]) -> dict[str, Any]:
        family = FAMILIES[self.family]
        if self.family == FULL:
            return {}
        shared = h2o_options if family.ours else quantized_options
        return {**shared, **family.options(self.bits)}


def parse_spec(text: str) -> FrontierSpec:
    """``FAMILY[@BUDGET][+intBITS]`` as a ``FrontierSpec``; a ValueError naming what is wrong otherwise."""
    match = _SPEC.match(text.strip())
    family = FAMILIES.get(match["family"]) if match else None
    if family is None:
        raise ValueError(f"specs: {text!r} is not FAMILY[@BUDGET][+intBITS] with FAMILY one of {list(FAMILIES)} "
                         "(e.g. h2o@0.64+int4, keep_all+int4, quanto+int2, streaming@0.2, full)")
    budget = float(match["budget"]) if match["budget"] else None
    bits = int(match["bits"]) if match["bits"] else None
    if family.budget and (budget is None or not 0.0 < budget <= 1.0):
        raise ValueError(f"specs: {text!r} needs a budget in (0, 1] after '@' (e.g. {match['family']}@0.2)")
    if not family.budget and budget is not None:
        raise ValueError(f"specs: {text!r}: {match['family']} keeps every token and takes no '@budget'")
    if bits not in family.bits:
        allowed = [f"+int{b}" if b else "no +int" for b in family.bits]
        raise ValueError(f"specs: {text!r}: {match['family']} takes {allowed}")
    return FrontierSpec(text.strip(), match["family"], budget, bits)


def parse_specs(texts: Sequence[str]) -> list[FrontierSpec]:
    specs = [parse_spec(t) for t in texts]
    if not specs:
        raise ValueError("specs: give at least one spec")
    return list(dict.fromkeys(specs))


# The default frontier: the full cache; H2O, streaming and local alone; quantisation alone (ours at 8/4/2 bits,
# QuantizedCache with both backends); H2O + quantisation at budgets that land around 10-30% of the fp16 bytes.
DEFAULT_SPECS = (
    "full",
    "h2o@0.1", "h2o@0.2", "h2o@0.5", "streaming@0.1", "streaming@0.2", "streaming@0.5",
    "local@0.1", "local@0.2", "local@0.5",
    "keep_all+int8", "keep_all+int4", "keep_all+int2",
    "quanto+int4", "quanto+int2", "hqq+int4", "hqq+int2",
    "h2o@0.3+int4", "h2o@0.5+int4", "h2o@0.64+int4", "h2o@0.5+int2", "h2o@0.8+int2", "h2o@0.25+int8",
    "streaming@0.64+int4",
)


def _skip_reason(spec: FrontierSpec, model: Any, prompt_len: int, quantized_options: dict[str, Any]) -> str | None:
    """Why ``spec`` cannot run here (a backend missing or failing), or None."""
    if FAMILIES[spec.family].ours:
        return None
    from .caches import make_cache

    cache, reason = make_cache(spec.cache, model, None, prompt_len, **spec.options({}, quantized_options))
    del cache
    return reason


def _spec_row(spec: FrontierSpec, row: dict[str, Any]) -> dict[str, Any]:
    return {"spec": spec.name, "method": spec.method, "family": spec.family, "bits": spec.bits, **row,
            "budget": spec.budget}


def evaluate_frontier(model: Any, tokenizer: Any, *, specs: Sequence[str] = DEFAULT_SPECS,
                      tasks: Sequence[str] = ("perplexity", "retrieval"), text: str | None = None,
                      prompt_len: int = 512, gen_len: int = 128, windows: int = 4,
                      retrieval_lengths: Sequence[int] = (256, 512), retrieval_depths: Sequence[float] = (0.1, 0.5, 0.9),
                      retrieval_samples: int = 2, lm_eval_tasks: Sequence[str] | None = None,
                      lm_eval_limit: int | None = 10, h2o_options: dict[str, Any] | None = None,
                      quantized_options: dict[str, Any] | None = None, seed: int = 0, model_name: str = "model",
                      progress: bool = True, on_spec: Callable[[list[dict[str, Any]]], None] | None = None
                      ) -> dict[str, Any]:
    """Every task for every spec; returns ``{"settings", "rows", "bars", "date", "machine"}``. Each row carries
    ``spec``, ``method``, ``kv_bytes`` and ``byte_share``; a spec that cannot run here gives one ``skipped`` row
    with the reason. ``on_spec`` is called with the rows so far after every spec (a long run's checkpoint)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks: {unknown or 'empty'} not supported; choose from {list(TASKS)}")
    parsed = parse_specs(specs)
    h2o_options, quantized_options = dict(h2o_options or {}), dict(quantized_options or {})
    text = load_text() if text is None else text
    rows: list[dict[str, Any]] = []
    for spec in tqdm(parsed, desc="frontier", disable=not progress):
        reason = _skip_reason(spec, model, prompt_len, quantized_options)
        if reason is not None:
            rows.append({"spec": spec.name, "method": spec.method, "task": "all", "status": "skipped",
                         "reason": reason})
            continue
        options = spec.options(h2o_options, quantized_options)
        configs = [(spec.cache, 1.0 if spec.budget is None else spec.budget)]
        if "perplexity" in tasks:
            for row in run_perplexity(model, tokenizer, text, configs, prompt_len=prompt_len, gen_len=gen_len,
                                      windows=windows, h2o_options=options, progress=False):
                rows.append(_spec_row(spec, row))
        if "retrieval" in tasks:
            for row in run_retrieval(model, tokenizer, text, configs, lengths=retrieval_lengths,
                                     depths=retrieval_depths, samples=retrieval_samples, seed=seed,
                                     h2o_options=options, progress=False):
                rows.append(_spec_row(spec, row))
        if "lm_eval" in tasks:
            rows.append(_spec_row(spec, _lm_eval_row(model, tokenizer, spec, configs[0], options, lm_eval_tasks,
                                                     lm_eval_limit)))
        if on_spec is not None:
            on_spec(rows)
    settings = {"model": model_name, "specs": [s.name for s in parsed], "tasks": list(tasks),
                "prompt_len": prompt_len, "gen_len": gen_len, "windows": windows,
                "retrieval_lengths": list(retrieval_lengths), "retrieval_depths": list(retrieval_depths),
                "retrieval_samples": retrieval_samples, "lm_eval_tasks": lm_eval_tasks, "lm_eval_limit": lm_eval_limit,
                "h2o_options": h2o_options, "quantized_options": quantized_options, "seed": seed,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return {"settings": settings, "rows": rows, "bars": check_bars(rows), "date": _dt.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}


def _lm_eval_row(model: Any, tokenizer: Any, spec: FrontierSpec, config: tuple[str, float], options: dict[str, Any],
                 lm_eval_tasks: Sequence[str] | None, limit: int | None) -> dict[str, Any]:
    if not FAMILIES[spec.family].ours:
        return {"task": "lm_eval", "status": "skipped",
                "reason": "H2OLM (the h2o lm-eval model) builds H2OCache and DynamicCache only"}
    from .lm_eval_model import run_lm_eval  # needs lm-eval (the eval extra)

    usage: dict[str, int] = {}
    metrics = run_lm_eval(model, tokenizer, tasks=lm_eval_tasks, policy=config[0], budget=min(config[1], 1.0),
                          limit=limit, h2o_options=options, kv_usage=usage)
    if spec.family == FULL:  # HFLM's own path: no cache object; DynamicCache holds every token in the model dtype
        share = next(model.parameters()).element_size() / 2
        stored = None
    else:
        stored = usage["kv_bytes"]
        share = stored / usage["fp16_bytes"] if usage["fp16_bytes"] else None
    return {"task": "lm_eval", "metrics": metrics, "kv_bytes": stored, "byte_share": share}


def _points(rows: Sequence[dict[str, Any]], task: str, key: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("task") == task and r.get(key) is not None and r.get("byte_share") is not None]


def check_bars(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 9's quality bars, read from the rows (each a dict with the measured values and ``met``):

    - at <= 20% of the fp16 bytes, the best spec of ``OURS``: perplexity <= +5% over the full cache and its retrieval
      accuracy >= 70% of the full cache's (one spec must meet both);
    - at <= 12.5% of the bytes, perplexity <= +12%;
    - against every QuantizedCache spec and every other eviction-only policy's spec: the best of ``OURS`` at no
      more bytes is at least as good (perplexity, and retrieval accuracy).
    """
    ppl = {r["spec"]: r for r in _points(rows, "perplexity", "perplexity")}
    acc = {r["spec"]: r for r in _points(rows, "retrieval", "accuracy")}
    full_ppl = next((r["perplexity"] for r in ppl.values() if r["family"] == FULL), None)
    full_acc = next((r["accuracy"] for r in acc.values() if r["family"] == FULL), None)
    bars: list[dict[str, Any]] = []
    if full_ppl is None:
        return bars
    for limit, ppl_gap, acc_floor in ((0.20, 0.05, 0.70), (0.125, 0.12, None)):
        name = (f"<= {limit:.1%} of fp16 bytes: perplexity <= +{ppl_gap:.0%}"
                + (f", retrieval >= {acc_floor:.0%} of full" if acc_floor else ""))
        best = None
        for spec, r in ppl.items():
            if r["family"] not in OURS or r["byte_share"] > limit:
                continue
            gap = r["perplexity"] / full_ppl - 1
            ratio = acc[spec]["accuracy"] / full_acc if spec in acc and full_acc else None
            met = gap <= ppl_gap and (acc_floor is None or (ratio is not None and ratio >= acc_floor))
            key = (met, -gap)
            if best is None or key > best[0]:
                best = (key, {"bar": name, "spec": spec, "byte_share": r["byte_share"], "perplexity_gap": gap,
                              "retrieval_ratio": ratio, "met": met})
        bars.append(best[1] if best else {"bar": name, "spec": None, "met": False,
                                          "reason": "no H2O spec measured at this byte share"})
    for task, table, key, better in (("perplexity", ppl, "perplexity", min), ("retrieval", acc, "accuracy", max)):
        ours = [r for r in table.values() if r["family"] in OURS]
        others = [r for r in table.values() if r["family"] in ("quanto", "hqq")
                  or (r["family"] in EVICTING and r["family"] not in OURS and r["bits"] is None)]
        for other in sorted(others, key=lambda r: r["byte_share"]):
            cheaper = [r for r in ours if r["byte_share"] <= other["byte_share"] + 1e-9]
            if not cheaper:
                continue
            best = better(cheaper, key=lambda r: r[key])
            met = best[key] <= other[key] if better is min else best[key] >= other[key]
            bars.append({"bar": f"{task}: best H2O at <= {other['byte_share']:.1%} of bytes vs {other['spec']}",
                         "spec": best["spec"], "byte_share": best["byte_share"], "value": best[key],
                         "other": other[key], "met": met})
    return bars
