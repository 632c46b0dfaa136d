"""Quality reports: ``results.json``, ``results.md`` and one PNG per task (quality vs budget, one line per
policy)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .caches import FULL


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
    if results.get("targets"):
        rows_t = [{**t, "met": "yes" if t["met"] else "NO"} for t in results["targets"]]
        md.append("\n## targets\n\n" + report.markdown_table(rows_t, ["target", "h2o", "other", "met"]))
    paths["md"] = out_dir / "results.md"
    report.write_text(paths["md"], "".join(md))
    return paths
