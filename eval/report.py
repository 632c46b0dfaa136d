"""Generic report helpers shared by the evaluation scripts: JSON, markdown tables and line plots.

Kept free of anything quality- or throughput-specific so every ``h2o_cache.eval`` module can use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from h2o_cache.files import atomic_write

logger = logging.getLogger(__name__)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` whole (temporary file + rename): an interrupted run never leaves half a report."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, floatfmt: str = ".3f",
                   headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``; missing cells print as ``-``."""
    headers = list(headers) if headers is not None else list(columns)
    if len(headers) != len(columns):
        raise ValueError(f"headers: expected {len(columns)} names, got {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def line_plot(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
              xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None, logy: bool = False,
              xpercent: bool = False) -> Path | None:
    """One line per series name (``{name: (xs, ys)}``), optional horizontal reference lines; saves a PNG.

    Returns None (with a warning) when matplotlib is not installed, so a report never fails for a missing plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless machines
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'h2o-cache[eval]')", path)
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot([x * 100 if xpercent else x for x in xs], ys, marker="o", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="black", linewidth=1, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def panel_plot(path: str | Path, panels: Sequence[Mapping[str, Any]], *, title: str, xlabel: str,
               logx: bool = False) -> Path | None:
    """Panels side by side sharing one x axis; each panel is ``{"ylabel", "series": {name: (xs, ys)}, "hlines":
    {name: y}, "logy": bool}`` (``hlines``, ``logy`` optional). Saved whole (temporary file + rename); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'h2o-cache[eval]')", path)
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, (xs, ys) in panel["series"].items():
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=name)
        for name, y in (panel.get("hlines") or {}).items():
            ax.axhline(y, linestyle="--", color="black", linewidth=1, label=name)
        if logx:
            ax.set_xscale("log")
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel["ylabel"])
        ax.grid(True, alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
