"""Quality of H2O vs the full cache and the other eviction policies, at equal KV budgets.

Three tasks, one machinery (every policy is ``H2OCache(policy=...)``; ``full`` is transformers' ``DynamicCache``):

- ``perplexity``: windows of real text; the first ``prompt_len`` tokens are prefilled (the cache evicts down to
  the budget at the end of the prefill), then the next ``gen_len`` tokens are fed ONE AT A TIME and scored, so
  every scored token is predicted through the compressed cache and eviction happens at every decode step.
  The prediction made by the prefill's last position (which still attended to the whole prompt) is not scored.
- ``retrieval``: a pass key hidden at several depths of real-text haystacks of several lengths; greedy
  ``generate(cache_implementation="h2o")``; accuracy = the first number generated is the key.
- ``lm_eval``: the project's local lm-eval tasks (``eval/tasks``) through ``H2OLM`` (see ``lm_eval_model``).

Budgets are fractions of the prompt (context) length; the total budget ``round(b * length)`` is passed as
``heavy_budget = total // 2`` and ``recent_budget = total - heavy``; each policy re-splits that total its own way.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import platform
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from h2o_cache.cache import H2OCache
from h2o_cache.compat import cache_kwargs
from h2o_cache.config import GQA_AGGREGATIONS, POLICIES, SCORE_NORMALIZATIONS

from . import report

logger = logging.getLogger(__name__)

FULL = "full"
ALL_POLICIES = (FULL, *POLICIES)
DEFAULT_POLICIES = (FULL, "h2o", "local", "streaming", "random", "h2o_no_recent")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
TASKS = ("perplexity", "retrieval", "lm_eval")

PASSKEY_NEEDLE = "\nThe secret pass key is {key}. Remember: the pass key is {key}.\n"
PASSKEY_QUESTION = "\n\nQuestion: What is the secret pass key?\nAnswer: The secret pass key is"


# ---- validation and cache construction --------------------------------------------------------------------------
def check_policies(policies: Sequence[str]) -> list[str]:
    unknown = [p for p in policies if p not in ALL_POLICIES]
    if unknown or not policies:
        raise ValueError(f"policies: {unknown or 'empty'} not supported; choose from {list(ALL_POLICIES)}")
    return list(dict.fromkeys(policies))


def check_budgets(budgets: Sequence[float]) -> list[float]:
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= 1.0]
    if bad or not budgets:
        raise ValueError(f"budgets: every budget must be a fraction in (0, 1], got {list(budgets)}")
    return sorted(dict.fromkeys(float(b) for b in budgets))


def budget_tokens(budget: float, length: int) -> tuple[int, int]:
    """``(heavy_budget, recent_budget)`` for a total of ``budget * length`` tokens (at least 2, at most length)."""
    total = min(length, max(2, round(budget * length)))
    heavy = total // 2
    return heavy, total - heavy


def cache_options(policy: str, budget: float, length: int, **h2o_options: Any) -> dict[str, Any]:
    """``cache_config`` for ``H2OCache`` / ``generate(cache_implementation="h2o")``."""
    heavy, recent = budget_tokens(budget, length)
    return {"policy": policy, "heavy_budget": heavy, "recent_budget": recent, **h2o_options}


def make_cache(model: Any, policy: str, budget: float, length: int, **h2o_options: Any) -> Any:
    """A fresh cache for ``policy`` at ``budget`` of ``length`` tokens; ``full`` gives a ``DynamicCache``."""
    if policy == FULL:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    return H2OCache(model.config, **cache_options(policy, budget, length, **h2o_options))


def configurations(policies: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """(policy, budget) pairs: ``full`` once (budget 1.0), every other policy at every budget."""
    out = [(FULL, 1.0)] if FULL in policies else []
    return out + [(p, b) for p in policies if p != FULL for b in budgets]


# ---- text -------------------------------------------------------------------------------------------------------
def load_text(path: str | Path | None = None) -> str:
    """The evaluation text: a .txt file, a JSONL file (its ``text`` fields joined), or the reference text."""
    if path is None:
        from h2o_cache.models import reference_text

        return reference_text()
    path = Path(path)
    if not path.exists():
        raise ValueError(f"text={str(path)!r}: no such file")
    if path.suffix == ".jsonl":
        docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in docs):
            raise ValueError(f"text={str(path)!r}: every JSONL line must be an object with a string 'text' field")
        return "\n\n".join(d["text"] for d in docs)
    return path.read_text()


def token_stream(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_windows(tokens: Sequence[int], n_windows: int, length: int) -> torch.Tensor:
    """``n_windows`` windows of ``length`` tokens evenly spaced over the stream (deterministic, no picking)."""
    if n_windows < 1:
        raise ValueError(f"windows must be >= 1, got {n_windows}")
    if len(tokens) < length:
        raise ValueError(f"the text has {len(tokens)} tokens; a window needs {length} (prompt_len + gen_len + 1)")
    span = len(tokens) - length
    starts = [round(i * span / max(1, n_windows - 1)) if n_windows > 1 else 0 for i in range(n_windows)]
    return torch.tensor([tokens[s : s + length] for s in starts], dtype=torch.long)


# ---- task 1: streaming perplexity ---------------------------------------------------------------------------------
@torch.inference_mode()
def streaming_nll(model: Any, windows: torch.Tensor, prompt_len: int, cache: Any, *, progress: bool = False
                  ) -> tuple[float, int]:
    """Summed NLL and token count of ``windows[:, prompt_len + 1:]``, each token predicted one step at a time.

    The prompt is prefilled (the cache evicts to its budget there); token ``prompt_len`` is then fed alone, its
    logits predict token ``prompt_len + 1``, and so on: every scored prediction reads the compressed cache.
    """
    if not 0 < prompt_len < windows.shape[1] - 1:
        raise ValueError(f"prompt_len must be in (0, {windows.shape[1] - 1}), got {prompt_len}")
    windows = windows.to(model.device)
    model(input_ids=windows[:, :prompt_len], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    total, count = 0.0, 0
    steps = range(prompt_len, windows.shape[1] - 1)
    for i in tqdm(steps, desc="decode", leave=False, disable=not progress):
        out = model(input_ids=windows[:, i : i + 1], **cache_kwargs(cache), use_cache=True)
        logits = out.logits[:, -1].float()
        total += torch.nn.functional.cross_entropy(logits, windows[:, i + 1], reduction="sum").item()
        count += windows.shape[0]
    return total, count


def run_perplexity(model: Any, tokenizer: Any, text: str, configs: Sequence[tuple[str, float]], *,
                   prompt_len: int = 512, gen_len: int = 128, windows: int = 4, h2o_options: dict | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Perplexity per (policy, budget) over the same windows; one row per configuration."""
    if gen_len < 1:
        raise ValueError(f"gen_len must be >= 1, got {gen_len}")
    batch = text_windows(token_stream(tokenizer, text), windows, prompt_len + gen_len + 1)
    rows = []
    for policy, budget in tqdm(configs, desc="perplexity", disable=not progress):
        start = time.perf_counter()
        cache = make_cache(model, policy, budget, prompt_len, **(h2o_options or {}))
        nll, n = streaming_nll(model, batch, prompt_len, cache, progress=progress)
        rows.append({"task": "perplexity", "policy": policy, "budget": budget,
                     "budget_tokens": prompt_len if policy == FULL else sum(budget_tokens(budget, prompt_len)),
                     "nll": nll / n, "perplexity": math.exp(nll / n), "tokens": n,
                     "seconds": round(time.perf_counter() - start, 2)})
        logger.info("perplexity %s@%.2f: %.3f", policy, budget, rows[-1]["perplexity"])
    return rows


# ---- task 2: pass-key retrieval -----------------------------------------------------------------------------------
def passkey_cases(tokenizer: Any, tokens: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
                  samples: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Prompts of exactly ``length`` tokens: real-text haystack, a 5-digit key at ``depth``, then the question.

    Each (length, depth, sample) takes its haystack from a different, seeded place of the text.
    """
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must be in [0, 1], got {bad}")
    rng = random.Random(seed)
    question = token_stream(tokenizer, PASSKEY_QUESTION)
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randint(10000, 99999))
                needle = token_stream(tokenizer, PASSKEY_NEEDLE.format(key=key))
                hay_len = length - len(needle) - len(question)
                if hay_len < 1:
                    raise ValueError(f"lengths: {length} tokens is too short for the needle and question")
                start = rng.randrange(0, len(tokens) - hay_len)
                hay = list(tokens[start : start + hay_len])
                at = round(depth * hay_len)
                ids = hay[:at] + needle + hay[at:] + question
                cases.append({"length": length, "depth": depth, "key": key, "input_ids": ids})
    return cases


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.inference_mode()
def retrieve(model: Any, tokenizer: Any, cases: Sequence[dict[str, Any]], policy: str, budget: float, *,
             max_new_tokens: int = 8, batch_size: int = 8, h2o_options: dict | None = None) -> list[bool]:
    """Greedy-generate an answer for each case with ``cache_implementation="h2o"`` (or the full cache)."""
    hits = []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i : i + batch_size]
        length = len(chunk[0]["input_ids"])
        if any(len(c["input_ids"]) != length for c in chunk):
            raise ValueError("retrieve: a batch must hold prompts of one length (no padding)")
        ids = torch.tensor([c["input_ids"] for c in chunk], device=model.device)
        kwargs: dict[str, Any] = {}
        if policy != FULL:
            kwargs = {"cache_implementation": "h2o",
                      "cache_config": cache_options(policy, budget, length, **(h2o_options or {}))}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
        for case, row in zip(chunk, out[:, length:], strict=True):
            hits.append(first_number(tokenizer.decode(row, skip_special_tokens=True)) == case["key"])
    return hits


def run_retrieval(model: Any, tokenizer: Any, text: str, configs: Sequence[tuple[str, float]], *,
                  lengths: Sequence[int] = (256, 512), depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 2,
                  seed: int = 0, batch_size: int = 8, h2o_options: dict | None = None, progress: bool = True
                  ) -> list[dict[str, Any]]:
    """Pass-key accuracy per (policy, budget), overall and per length/depth cell."""
    cases = passkey_cases(tokenizer, token_stream(tokenizer, text), lengths, depths, samples, seed)
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(len(case["input_ids"]), []).append(case)
    rows = []
    for policy, budget in tqdm(configs, desc="retrieval", disable=not progress):
        start = time.perf_counter()
        cells: dict[str, list[bool]] = {}
        hits_all: list[bool] = []
        for group in groups.values():
            hits = retrieve(model, tokenizer, group, policy, budget, batch_size=batch_size, h2o_options=h2o_options)
            hits_all += hits
            for case, hit in zip(group, hits, strict=True):
                cells.setdefault(f"len{case['length']}_depth{case['depth']:g}", []).append(hit)
        rows.append({"task": "retrieval", "policy": policy, "budget": budget,
                     "accuracy": sum(hits_all) / len(hits_all), "cases": len(hits_all),
                     "cells": {k: sum(v) / len(v) for k, v in cells.items()},
                     "seconds": round(time.perf_counter() - start, 2)})
        logger.info("retrieval %s@%.2f: %.3f", policy, budget, rows[-1]["accuracy"])
    return rows


# ---- bars and report ----------------------------------------------------------------------------------------------
def check_bars(rows: Sequence[dict[str, Any]], *, tolerance: float = 0.10) -> list[dict[str, Any]]:
    """The project's bars: H2O >= local/streaming/random at every budget (perplexity and retrieval), and
    H2O's perplexity at 20% within ``tolerance`` of the full cache's."""
    def value(task: str, key: str, policy: str, budget: float) -> float | None:
        for r in rows:
            if r["task"] == task and r["policy"] == policy and (policy == FULL or abs(r["budget"] - budget) < 1e-9):
                return r[key]
        return None

    bars = []
    budgets = sorted({r["budget"] for r in rows if r["policy"] == "h2o"})
    for task, key, better in (("perplexity", "perplexity", min), ("retrieval", "accuracy", max)):
        for budget in budgets:
            h2o = value(task, key, "h2o", budget)
            for other in ("local", "streaming", "random"):
                o = value(task, key, other, budget)
                if h2o is None or o is None:
                    continue
                met = h2o <= o if better is min else h2o >= o
                bars.append({"bar": f"{task}: h2o vs {other} @ {budget:.0%}", "h2o": h2o, "other": o, "met": met})
    full, h2o20 = value("perplexity", "perplexity", FULL, 1.0), value("perplexity", "perplexity", "h2o", 0.2)
    if full is not None and h2o20 is not None:
        gap = h2o20 / full - 1
        bars.append({"bar": f"perplexity: h2o @ 20% within {tolerance:.0%} of full", "h2o": h2o20, "other": full,
                     "gap": gap, "met": gap <= tolerance})
    return bars


def _pivot(rows: Sequence[dict], task: str, key: str, budgets: Sequence[float]) -> tuple[list[dict], list[str]]:
    columns = ["policy"] + [f"{b:.0%}" for b in budgets]
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["task"] != task:
            continue
        line = table.setdefault(r["policy"], {"policy": r["policy"]})
        if r["policy"] == FULL:
            for b in budgets:
                line[f"{b:.0%}"] = r[key]
        else:
            line[f"{r['budget']:.0%}"] = r[key]
    return list(table.values()), columns


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and one PNG per task (quality vs budget, one line per policy)."""
    out_dir = Path(out_dir)
    rows = results["rows"]
    budgets = results["settings"]["budgets"]
    paths = {"json": report.write_json(out_dir / "results.json", results)}
    md = [f"# h2o-cache quality evaluation\n\nModel: {results['settings']['model']}; "
          f"date: {results['date']}; machine: {results['machine']}.\n"]
    plots = (("perplexity", "perplexity", "perplexity (lower is better)", False),
             ("retrieval", "accuracy", "pass-key accuracy", False))
    for task, key, ylabel, logy in plots:
        if not any(r["task"] == task for r in rows):
            continue
        table, columns = _pivot(rows, task, key, budgets)
        md.append(f"\n## {task} ({key})\n\n" + report.markdown_table(table, columns))
        series = {p["policy"]: ([b for b in budgets if f"{b:.0%}" in p], [p[f"{b:.0%}"] for b in budgets
                                                                           if f"{b:.0%}" in p])
                  for p in table if p["policy"] != FULL}
        full = [p for p in table if p["policy"] == FULL]
        png = report.line_plot(out_dir / f"{task}.png", series, title=f"{task} vs KV budget",
                               xlabel="KV budget (% of prompt)", ylabel=ylabel, xpercent=True, logy=logy,
                               hlines={"full cache": full[0][f"{budgets[0]:.0%}"]} if full else None)
        if png is not None:
            paths[task] = png
            md.append(f"\n![{task}]({png.name})\n")
    lm_rows = [r for r in rows if r["task"] == "lm_eval"]
    if lm_rows:
        metrics = sorted({k for r in lm_rows for k in r["metrics"]})
        flat = [{"policy": r["policy"], "budget": f"{r['budget']:.0%}", **r["metrics"]} for r in lm_rows]
        md.append("\n## lm-eval (local tasks)\n\n" + report.markdown_table(flat, ["policy", "budget", *metrics]))
        for metric in metrics:
            series = {}
            for r in lm_rows:
                if r["policy"] != FULL and metric in r["metrics"]:
                    xs, ys = series.setdefault(r["policy"], ([], []))
                    xs.append(r["budget"])
                    ys.append(r["metrics"][metric])
            full = [r["metrics"][metric] for r in lm_rows if r["policy"] == FULL and metric in r["metrics"]]
            if series:
                name = "lm_eval_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
                png = report.line_plot(out_dir / f"{name}.png", series, title=metric, xlabel="KV budget (%)",
                                       ylabel=metric, xpercent=True,
                                       hlines={"full cache": full[0]} if full else None)
                if png is not None:
                    paths[name] = png
    if results.get("bars"):
        bars = [{**b, "met": "yes" if b["met"] else "NO"} for b in results["bars"]]
        md.append("\n## bars\n\n" + report.markdown_table(bars, ["bar", "h2o", "other", "met"]))
    paths["md"] = out_dir / "results.md"
    paths["md"].write_text("".join(md))
    return paths


# ---- runner -------------------------------------------------------------------------------------------------------
def evaluate(model: Any, tokenizer: Any, *, tasks: Sequence[str] = TASKS, policies: Sequence[str] = DEFAULT_POLICIES,
             budgets: Sequence[float] = DEFAULT_BUDGETS, text: str | None = None, prompt_len: int = 512,
             gen_len: int = 128, windows: int = 4, retrieval_lengths: Sequence[int] = (256, 512),
             retrieval_depths: Sequence[float] = (0.1, 0.5, 0.9), retrieval_samples: int = 2,
             lm_eval_tasks: Sequence[str] | None = None, lm_eval_limit: int | None = 20,
             lm_eval_budgets: Sequence[float] | None = None, lm_eval_include_path: str | None = None,
             h2o_options: dict | None = None, seed: int = 0, model_name: str = "model", progress: bool = True
             ) -> dict[str, Any]:
    """Run the chosen tasks for every (policy, budget); returns ``{"settings", "rows", "bars", ...}``."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: {unknown} not supported; choose from {list(TASKS)}")
    policies, budgets = check_policies(policies), check_budgets(budgets)
    configs = configurations(policies, budgets)
    text = load_text() if text is None else text
    h2o_options = dict(h2o_options or {})
    rows: list[dict[str, Any]] = []
    if "perplexity" in tasks:
        rows += run_perplexity(model, tokenizer, text, configs, prompt_len=prompt_len, gen_len=gen_len,
                               windows=windows, h2o_options=h2o_options, progress=progress)
    if "retrieval" in tasks:
        rows += run_retrieval(model, tokenizer, text, configs, lengths=retrieval_lengths, depths=retrieval_depths,
                              samples=retrieval_samples, seed=seed, h2o_options=h2o_options, progress=progress)
    if "lm_eval" in tasks:
        from .lm_eval_model import run_lm_eval

        lm_configs = configurations(policies, check_budgets(lm_eval_budgets) if lm_eval_budgets else budgets)
        for policy, budget in tqdm(lm_configs, desc="lm-eval", disable=not progress):
            metrics = run_lm_eval(model, tokenizer, tasks=lm_eval_tasks, policy=policy, budget=budget,
                                  limit=lm_eval_limit, h2o_options=h2o_options, include_path=lm_eval_include_path)
            rows.append({"task": "lm_eval", "policy": policy, "budget": budget, "metrics": metrics})
    settings = {"model": model_name, "tasks": list(tasks), "policies": policies, "budgets": budgets,
                "prompt_len": prompt_len, "gen_len": gen_len, "windows": windows,
                "retrieval_lengths": list(retrieval_lengths), "retrieval_depths": list(retrieval_depths),
                "retrieval_samples": retrieval_samples, "lm_eval_tasks": lm_eval_tasks, "lm_eval_limit": lm_eval_limit,
                "lm_eval_budgets": list(lm_eval_budgets) if lm_eval_budgets else budgets,
                "h2o_options": h2o_options, "seed": seed}
    return {"settings": settings, "rows": rows, "bars": check_bars(rows),
            "date": _dt.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local model folder or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tasks", type=_strs, default=list(TASKS),
                        help=f"comma-separated tasks among {','.join(TASKS)} (default: all)")
    parser.add_argument("--policies", type=_strs, default=list(DEFAULT_POLICIES),
                        help=f"comma-separated policies among {','.join(ALL_POLICIES)} (default: all)")
    parser.add_argument("--budgets", type=_floats, default=list(DEFAULT_BUDGETS),
                        help="comma-separated total KV budgets as fractions of the prompt length (default: "
                             "0.05,0.1,0.2,0.5); heavy and recent get half each, other policies re-split it")
    parser.add_argument("--text", default=None,
                        help="evaluation text: a .txt file or a JSONL file with a 'text' field per line "
                             "(default: the Python reference text from pydoc_data.topics)")
    parser.add_argument("--prompt-len", type=int, default=512, help="perplexity: prefilled tokens (default 512)")
    parser.add_argument("--gen-len", type=int, default=128,
                        help="perplexity: tokens scored one at a time after the prompt (default 128)")
    parser.add_argument("--windows", type=int, default=4,
                        help="perplexity: text windows, evenly spaced over the text, batched (default 4)")
    parser.add_argument("--retrieval-lengths", type=_ints, default=[256, 512],
                        help="retrieval: prompt lengths in tokens (default 256,512)")
    parser.add_argument("--retrieval-depths", type=_floats, default=[0.1, 0.5, 0.9],
                        help="retrieval: needle depths as fractions of the haystack (default 0.1,0.5,0.9)")
    parser.add_argument("--retrieval-samples", type=int, default=2,
                        help="retrieval: prompts per (length, depth) cell (default 2)")
    parser.add_argument("--lm-eval-tasks", type=_strs, default=None,
                        help="lm-eval task names (default: the project's local tasks in eval/tasks); standard "
                             "tasks work when their datasets are available locally")
    parser.add_argument("--lm-eval-data", action="append", default=[], metavar="TASK=FILE",
                        help="run lm-eval's standard TASK (e.g. copa, piqa) on FILE, a local JSONL export of the "
                             "split to evaluate with the dataset's own fields, instead of the unreachable hub; "
                             "repeat for several tasks (they run as TASK_local)")
    parser.add_argument("--lm-eval-limit", type=int, default=20, help="lm-eval: documents per task (default 20)")
    parser.add_argument("--lm-eval-budgets", type=_floats, default=None,
                        help="lm-eval: budgets to run (default: --budgets)")
    parser.add_argument("--gqa-aggregation", choices=GQA_AGGREGATIONS, default=None,
                        help="H2O: combine the query heads of one KV head by mean or max (default: the cache's)")
    parser.add_argument("--score-normalization", choices=SCORE_NORMALIZATIONS, default=None,
                        help="H2O: 'age' divides accumulated attention by the token's age (default: the cache's)")
    parser.add_argument("--sink-tokens", type=int, default=None, help="streaming: first tokens kept (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the retrieval keys and the random policy")
    parser.add_argument("--output", default="results/quality", help="results folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")


def run_cli(args: argparse.Namespace) -> int:
    from h2o_cache.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    h2o_options = {k: v for k, v in (("gqa_aggregation", args.gqa_aggregation),
                                     ("score_normalization", args.score_normalization),
                                     ("sink_tokens", args.sink_tokens)) if v is not None}
    if args.seed:
        h2o_options["seed"] = args.seed
    lm_eval_tasks, include_path = args.lm_eval_tasks, None
    if args.lm_eval_data:
        from .lm_eval_tasks import localize_standard_task

        include_path = str(Path(args.output) / "lm_eval_local_tasks")
        local = []
        for item in args.lm_eval_data:
            task, sep, data = item.partition("=")
            if not sep or not task or not data:
                raise ValueError(f"--lm-eval-data expects TASK=FILE, got {item!r}")
            local.append(localize_standard_task(task, data, include_path))
        lm_eval_tasks = [*(lm_eval_tasks or []), *local]
    results = evaluate(
        model, tokenizer, tasks=args.tasks, policies=args.policies, budgets=args.budgets,
        text=load_text(args.text) if args.text else None, prompt_len=args.prompt_len, gen_len=args.gen_len,
        windows=args.windows, retrieval_lengths=args.retrieval_lengths, retrieval_depths=args.retrieval_depths,
        retrieval_samples=args.retrieval_samples, lm_eval_tasks=lm_eval_tasks, lm_eval_limit=args.lm_eval_limit,
        lm_eval_budgets=args.lm_eval_budgets, lm_eval_include_path=include_path, h2o_options=h2o_options,
        seed=args.seed,
        model_name=args.model or "embedded SmolLM2-135M-Instruct (fp32)", progress=not args.no_progress)
    paths = write_report(results, args.output)
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "eval", help="quality of H2O vs the full cache and other eviction policies (perplexity, retrieval, lm-eval)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h2o_cache.eval.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
