"""Frontier reports: ``frontier.json`` (everything), ``frontier.md`` (one table, the bars) and ``frontier.png``
(one figure: x = share of fp16 KV bytes, log scale; panels perplexity and retrieval accuracy; a line per method)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .caches import FULL


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One line per spec, sorted by byte share: perplexity (and its gap to the full cache), retrieval, lm-eval."""
    lines: dict[str, dict[str, Any]] = {}
    metrics: list[str] = []
    full_ppl = next((r["perplexity"] for r in rows if r.get("task") == "perplexity" and r.get("family") == FULL),
                    None)
    for r in rows:
        line = lines.setdefault(r["spec"], {"spec": r["spec"], "method": r["method"]})
        if r.get("status") == "skipped":
            line["note"] = f"skipped ({r.get('task')}): {r['reason']}"
            continue
        if r["task"] == "perplexity":
            line.update({"byte share": f"{r['byte_share']:.1%}", "_share": r["byte_share"],
                         "KV MiB": r["kv_bytes"] / 2**20, "perplexity": r["perplexity"]})
            if full_ppl:
                line["vs full"] = f"{r['perplexity'] / full_ppl - 1:+.1%}"
        elif r["task"] == "retrieval":
            line.update({"retrieval": r["accuracy"], "retrieval bytes": f"{r['byte_share']:.1%}"})
        elif r["task"] == "lm_eval":
            for k, v in r["metrics"].items():
                line[k] = v
                if k not in metrics:
                    metrics.append(k)
            if r.get("byte_share") is not None:
                line["lm-eval bytes"] = f"{r['byte_share']:.1%}"
    columns = ["spec", "method", "byte share", "KV MiB", "perplexity", "vs full", "retrieval", "retrieval bytes",
               *metrics, "lm-eval bytes", "note"]
    ordered = sorted(lines.values(), key=lambda x: -x.get("_share", -1.0))
    present = [c for c in columns if any(c in line for line in ordered)]
    return ordered, present


def _series(rows: Sequence[dict[str, Any]], task: str, key: str) -> tuple[dict[str, tuple[list, list]], float | None]:
    series: dict[str, tuple[list, list]] = {}
    full = None
    for r in rows:
        if r.get("task") != task or r.get(key) is None or r.get("byte_share") is None:
            continue
        if r["family"] == FULL:
            full = r[key]
        xs, ys = series.setdefault(r["method"], ([], []))
        xs.append(r["byte_share"])
        ys.append(r[key])
    return series, full


def write_frontier_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``frontier.json``, ``frontier.md`` and ``frontier.png`` in ``out_dir`` (each written whole)."""
    out_dir = Path(out_dir)
    rows = results["rows"]
    s = results["settings"]
    paths = {"json": report.write_json(out_dir / "frontier.json", results)}
    md = [f"# KV bytes vs quality (h2o-cache eval --frontier)\n\nModel: {s['model']} ({s['dtype']}); "
          f"date: {results['date']}; machine: {results['machine']}.\nByte share: bytes the cache held (everything "
          "counted) / bytes an fp16 cache holds for the same tokens. Perplexity: "
          f"{s['windows']} windows, {s['prompt_len']}-token prompt, {s['gen_len']} tokens scored one at a time.\n"]
    panels = []
    for task, key, ylabel in (("perplexity", "perplexity", "perplexity (lower is better, log scale)"),
                              ("retrieval", "accuracy", "pass-key accuracy")):
        series, full = _series(rows, task, key)
        if series:
            panels.append({"ylabel": ylabel, "series": series, "logy": task == "perplexity",
                           "hlines": {"full cache": full} if full is not None else None})
    if panels:
        png = report.panel_plot(out_dir / "frontier.png", panels, title="quality vs KV bytes",
                                xlabel="KV bytes / fp16 full cache (log scale)", logx=True)
        if png is not None:
            paths["png"] = png
            md.append(f"\n![frontier]({png.name})\n")
    table, columns = table_rows(rows)
    md.append("\n## Every configuration\n\n" + report.markdown_table(table, columns))
    if results.get("bars"):
        bars = [{**b, "met": "yes" if b["met"] else "NO"} for b in results["bars"]]
        md.append("\n## Bars (issue 9)\n\n" + report.markdown_table(
            bars, ["bar", "spec", "byte_share", "perplexity_gap", "retrieval_ratio", "value", "other", "met"]))
    paths["md"] = report.write_text(out_dir / "frontier.md", "".join(md))
    return paths


def merge_runs(folders: Sequence[str | Path], tags: Sequence[str]) -> dict[str, Any]:
    """One result from several ``--frontier`` runs (each folder's ``frontier.json``, else its checkpoint
    ``frontier.partial.json``): rows concatenated, a non-empty tag appended to a run's spec and method names (runs
    with other H2O options), bars recomputed over all rows. The first complete run gives the settings."""
    from .frontier import check_bars

    base, rows, runs = None, [], {}
    for folder, tag in zip(folders, tags, strict=True):
        path = Path(folder) / "frontier.json"
        if not path.exists():
            path = Path(folder) / "frontier.partial.json"
        if not path.exists():
            raise ValueError(f"{folder}: no frontier.json or frontier.partial.json")
        data = json.loads(path.read_text())
        base = base or (data if "settings" in data else None)
        runs[str(folder)] = {"file": path.name, "tag": tag, "settings": data.get("settings")}
        rows += [{**r, "spec": f"{r['spec']} {tag}".strip(), "method": f"{r['method']} {tag}".strip()}
                 for r in data["rows"]]
    if base is None:
        raise ValueError("merge: at least one run must be complete (frontier.json)")
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    return {**base, "rows": rows, "bars": check_bars(rows), "runs": runs,
            "settings": {**base["settings"], "specs": specs, "h2o_options": "per run (see runs)"}}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m h2o_cache.eval.frontier_report OUT RUN[:TAG] ...``: merge runs into one report in OUT."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m h2o_cache.eval.frontier_report", description=main.__doc__)
    p.add_argument("out", help="folder of the merged frontier.json/.md/.png")
    p.add_argument("runs", nargs="+", help="result folders of h2o-cache eval --frontier, each optionally :TAG")
    args = p.parse_args(argv)
    folders, tags = zip(*[(r.partition(":")[0], r.partition(":")[2]) for r in args.runs], strict=True)
    try:
        paths = write_frontier_report(merge_runs(folders, tags), args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
