"""Quality of H2O vs the full cache and the other eviction policies, at equal KV budgets.

Three tasks, one cache factory (``eval/caches``: every policy is ``H2OCache(policy=...)``, ``full`` is
transformers' ``DynamicCache``): ``perplexity`` (``eval/perplexity``), ``retrieval`` (``eval/retrieval``) and
``lm_eval``, the project's local lm-eval tasks (``eval/tasks``) through ``H2OLM`` (``eval/lm_eval_model``).

Budgets are fractions of the prompt (context) length, split half heavy, half recent by ``H2OConfig``; each policy
re-splits that total its own way. ``evaluate`` returns the rows, the targets (``check_targets``) and the settings;
``quality_report.write_report`` writes them.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .caches import FULL, check_budgets, check_policies, configurations
from .perplexity import run_perplexity
from .retrieval import run_retrieval
from .texts import load_text

DEFAULT_POLICIES = (FULL, "h2o", "local", "streaming", "random", "h2o_no_recent")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
TASKS = ("perplexity", "retrieval", "lm_eval")


def check_targets(rows: Sequence[dict[str, Any]], *, tolerance: float = 0.10) -> list[dict[str, Any]]:
    """The quality targets: H2O >= local/streaming/random at every budget (perplexity and retrieval), and
    H2O's perplexity at 20% within ``tolerance`` of the full cache's."""
    def value(task: str, key: str, policy: str, budget: float) -> float | None:
        for r in rows:
            if r["task"] == task and r["policy"] == policy and (policy == FULL or abs(r["budget"] - budget) < 1e-9):
                return r[key]
        return None

    targets = []
    budgets = sorted({r["budget"] for r in rows if r["policy"] == "h2o"})
    for task, key, better in (("perplexity", "perplexity", min), ("retrieval", "accuracy", max)):
        for budget in budgets:
            h2o = value(task, key, "h2o", budget)
            for other in ("local", "streaming", "random"):
                o = value(task, key, other, budget)
                if h2o is None or o is None:
                    continue
                met = h2o <= o if better is min else h2o >= o
                targets.append({"target": f"{task}: h2o vs {other} @ {budget:.0%}", "h2o": h2o, "other": o, "met": met})
    full, h2o20 = value("perplexity", "perplexity", FULL, 1.0), value("perplexity", "perplexity", "h2o", 0.2)
    if full is not None and h2o20 is not None:
        gap = h2o20 / full - 1
        targets.append({"target": f"perplexity: h2o @ 20% within {tolerance:.0%} of full", "h2o": h2o20, "other": full,
                     "gap": gap, "met": gap <= tolerance})
    return targets


def evaluate(model: Any, tokenizer: Any, *, tasks: Sequence[str] = TASKS, policies: Sequence[str] = DEFAULT_POLICIES,
             budgets: Sequence[float] = DEFAULT_BUDGETS, text: str | None = None, prompt_len: int = 512,
             gen_len: int = 128, windows: int = 4, retrieval_lengths: Sequence[int] = (256, 512),
             retrieval_depths: Sequence[float] = (0.1, 0.5, 0.9), retrieval_samples: int = 2,
             lm_eval_tasks: Sequence[str] | None = None, lm_eval_limit: int | None = 20,
             lm_eval_budgets: Sequence[float] | None = None, lm_eval_include_path: str | None = None,
             h2o_options: dict | None = None, seed: int = 0, model_name: str = "model", progress: bool = True
             ) -> dict[str, Any]:
    """Run the chosen tasks for every (policy, budget); returns ``{"settings", "rows", "targets", ...}``."""
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
        from .lm_eval_model import run_lm_eval  # needs lm-eval (the eval extra)

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
    return {"settings": settings, "rows": rows, "targets": check_targets(rows),
            "date": _dt.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
