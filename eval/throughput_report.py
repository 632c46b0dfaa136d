"""Throughput reports: the acceptance targets, ``throughput.json``, ``throughput.md`` and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .caches import FULL
from .report import line_plot, markdown_table, write_json, write_text

COLUMNS = ["system", "cache", "budget_pct", "budget_tokens", "batch", "prefill_micro_batch", "prompt_len", "gen",
           "prefill_tok_s",
           "decode_tok_s", "e2e_tok_s", "peak_gib", "kv_bytes", "step_s", "roofline_frac", "status", "reason"]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance targets, read from the grid's runs at the target configuration."""
    cfg = results["config"]
    runs = [r for r in results["grid"] if r.get("status") == "ok" and r["system"] == "hf"
            and r["batch"] == cfg["target_batch"] and r["prompt_len"] == cfg["target_prompt"]]

    def find(cache, pct=None):
        for r in runs:
            if r["cache"] == cache and (pct is None or (r["budget_pct"] is not None and abs(r["budget_pct"] - pct) < 0.5)):
                return r
        return None

    dyn, h20 = find(FULL), find("h2o", 20.0)
    full = next((r for r in runs if r["cache"] == "h2o" and r["budget_pct"] and r["budget_pct"] >= 100.0), None)
    out = []

    def target(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "met": None if value is None else ok(value)})

    ratio = lambda a, b, k: (a[k] / b[k]) if a and b and a.get(k) and b.get(k) else None  # noqa: E731
    target("H2O 20% decode tok/s / DynamicCache", ratio(h20, dyn, "decode_tok_s"), ">= 2", lambda v: v >= 2)
    sm = results.get("same_memory") or {}
    target("same memory: H2O e2e tok/s / full cache (each at its largest batch)", sm.get("e2e_ratio"), ">= 3",
        lambda v: v >= 3)
    target("H2O 20% decode step / memory-bandwidth limit", h20.get("roofline_frac") if h20 else None, ">= 0.5",
        lambda v: v >= 0.5)
    target("H2O budget>=length decode tok/s / DynamicCache", ratio(full, dyn, "decode_tok_s"), ">= 0.9",
        lambda v: v >= 0.9)
    target("H2O prefill time (with scoring) / plain sdpa prefill", ratio(h20, dyn, "prefill_s"), "<= 1.25",
        lambda v: v <= 1.25)
    target("H2O 20% peak memory / DynamicCache", ratio(h20, dyn, "peak_gib"), "<= 1.1", lambda v: v <= 1.1)
    target("H2O 20% stored KV bytes / DynamicCache", ratio(h20, dyn, "kv_bytes"), "<= 0.21", lambda v: v <= 0.21)
    return out


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / "throughput.json", results)}
    rows = results["grid"] + results.get("baselines", [])
    md = [f"# Throughput benchmark\n\nMachine: {results['machine']['description']}  \n"
          f"Command: `{results['command']}`  \nMemory bandwidth (copy): "
          f"{results['roofline']['bandwidth_gb_s']:.2f} GB/s\n",
          "## Runs\n", markdown_table(rows, COLUMNS, floatfmt=".3g")]
    if results.get("targets"):
        md += ["\n## Targets\n", markdown_table(results["targets"], ["target", "value", "goal", "met"],
                                                  floatfmt=".3f")]
    sm = results.get("same_memory")
    if sm:
        md.append(f"\n## Same memory budget: {sm['budget_gib']:.3f} GiB (prompt {sm['prompt_len']}, gen {sm['gen']})\n")
        md.append(f"Budget: {sm.get('budget_source', 'given')}. Peaks probed in a fresh process per probe where the "
                  "model has a folder.\n\n")
        md.append(f"Largest batch: full cache {sm.get('full_max_batch')}, H2O {sm.get('h2o_max_batch')}"
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
    write_text(paths["markdown"], "\n".join(md))
    plots = _plots(results, out_dir)
    paths.update(plots)
    return paths


def _plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    ok = [r for r in results["grid"] if r.get("status") == "ok" and r["system"] == "hf"]
    out = {}
    batch0 = results["config"]["target_batch"]
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
