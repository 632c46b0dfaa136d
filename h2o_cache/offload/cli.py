"""``h2o-cache profile`` and ``h2o-cache place``: build a neuron profile and a hot/cold placement plan.

The main CLI calls :func:`register_cli`; ``python -m h2o_cache.offload.cli`` runs these two commands alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import re
import sys
from pathlib import Path

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str, ffn_bytes: int) -> int:
    """``"30%"`` (of all FFN bytes), ``"12MiB"``, ``"5e6"`` or ``"5000000"`` -> bytes."""
    t = text.strip().lower()
    if t.endswith("%"):
        pct = _number(t[:-1], text)
        if not 0 <= pct <= 100:
            raise ValueError(f"--budget {text!r}: a percentage must lie in [0, 100]")
        return int(ffn_bytes * pct / 100)
    m = re.fullmatch(r"([0-9.e+]+)\s*([a-z]*)", t)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"--budget {text!r}: expected bytes, a size such as 12MiB/1.5GB, or a percentage like 30%")
    value = _number(m.group(1), text) * _UNITS[m.group(2)]
    if value > _MAX_BUDGET:
        raise ValueError(f"--budget {text!r} is larger than any memory (over 1 PiB); use e.g. 100% for everything")
    return int(value)


_MAX_BUDGET = 2**50


def _number(digits: str, text: str) -> float:
    try:
        value = float(digits)
    except ValueError:
        raise ValueError(f"--budget {text!r}: {digits!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--budget {text!r} is not a finite number")
    return value


def _parse_curve(text: str) -> list[float]:
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--curve {text!r}: expected comma-separated fractions such as 0.1,0.2,0.5") from None
    bad = [f for f in fractions if not 0.0 <= f <= 1.0]
    if bad:
        raise ValueError(f"--curve {text!r}: fractions must lie in [0, 1], got {bad}")
    return fractions


def _profile(args: argparse.Namespace) -> int:
    from h2o_cache.cli import check_positive, set_threads
    from h2o_cache.files import check_output
    from h2o_cache.models import load_model, resolve_dtype

    from .profiler import profile, read_texts, token_windows

    # Everything a user can get wrong is checked before the model runs, so a mistake costs no profiling time.
    check_positive(args, "seq_len", "max_tokens", "batch_size")
    set_threads(args.threads)
    resolve_dtype(args.dtype)
    check_output(args.out, option="--out", force=args.force, inputs=[args.text, args.model])
    texts = read_texts(args.text, field_name=args.field)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    windows = token_windows(tokenizer, texts, args.seq_len, args.max_tokens)
    prof = profile(model, windows, metric=args.metric, batch_size=args.batch_size,
                   model_name=args.model or "smollm2-135m (embedded)", source=args.text or "pydoc_data.topics")
    prof.save(args.out)
    print(f"profiled {prof.tokens_seen} tokens, {prof.n_layers} layers, "
          f"{sum(len(m) for m in prof.mass)} neurons ({prof.ffn_bytes() / 2**20:.1f} MiB of FFN) -> {args.out}")
    return 0


def _place(args: argparse.Namespace) -> int:
    from h2o_cache.files import check_output

    from .placement import capture_curve, place, plot_capture_curve
    from .profiler import NeuronProfile

    fractions = _parse_curve(args.curve) if args.curve else []
    check_output(args.out, option="--out", force=args.force, inputs=[args.profile])
    if args.plot:
        if not fractions:
            raise ValueError("--plot draws the --curve; give --curve fractions (it is '' now)")
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install matplotlib")
        check_output(args.plot, option="--plot", force=args.force, inputs=[args.profile])
        if Path(args.plot).resolve() == Path(args.out).resolve():
            raise ValueError(f"--plot and --out are both {args.out!r}; give two files")
    if args.time_limit <= 0:
        raise ValueError(f"--time-limit must be > 0 seconds (got {args.time_limit})")
    prof = NeuronProfile.load(args.profile)
    total = prof.ffn_bytes()
    budget = parse_budget(args.budget, total)
    plan = place(prof, budget, solver=args.solver, score=args.score, min_per_layer=args.min_per_layer,
                 group_size=args.group_size, time_limit=args.time_limit)
    curve = capture_curve(prof, fractions, solver=args.solver, score=args.score,
                          min_per_layer=args.min_per_layer) if fractions else []
    # Written only once everything is computed: a failure above leaves no output behind.
    plan.save(args.out)
    print(f"{args.solver}: {sum(len(h) for h in plan.hot)} hot neurons, {plan.hot_bytes} of {budget} budget bytes "
          f"({100 * plan.hot_bytes / total:.1f}% of FFN), captured {100 * plan.captured:.2f}% of {args.score} "
          f"-> {args.out}")
    if curve:
        print("budget(%FFN)  bytes        captured")
        for f, b, c in curve:
            print(f"{100 * f:11.1f}  {b:11d}  {100 * c:7.2f}%")
        if args.plot:
            plot_capture_curve(curve, args.plot, title=prof.model_name)
            print(f"plot -> {args.plot}")
    return 0


def register_cli(subparsers) -> None:
    """Add the ``profile`` and ``place`` subcommands to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("profile", help="record how often/strongly each FFN neuron fires on real text",
                              description="Run a model over text and save per-layer, per-neuron activation stats.")
    p.add_argument("--model", default=None, help="model folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default=None,
                   help="a .jsonl file (one record per line) or a text file (default: Python's pydoc_data.topics)")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens to profile on in all (default: 16384)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    p.add_argument("--metric", choices=["product", "gate"], default="product",
                   help="SwiGLU activation to record: |act(gate)*up| (product) or |act(gate)| (gate)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="neuron_profile.pt", help="profile file to write (default: neuron_profile.pt)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_profile)

    q = subparsers.add_parser("place", help="choose hot neurons for a fast-device memory budget",
                              description="Solve the hot-neuron placement for a budget and save the plan (JSON).")
    q.add_argument("--profile", required=True, help="profile file written by `h2o-cache profile`")
    q.add_argument("--budget", required=True, help="fast-device bytes for FFN weights: 5000000, 12MiB or 30%%")
    q.add_argument("--solver", choices=["greedy", "ilp"], default="greedy",
                   help="greedy top-k by score per byte, or an exact ILP (scipy milp/HiGHS)")
    q.add_argument("--score", choices=["mass", "count"], default="mass",
                   help="maximise captured activation mass or firing count (default: mass)")
    q.add_argument("--min-per-layer", type=int, default=0, help="hot neurons every layer must get (default: 0)")
    q.add_argument("--group-size", type=int, default=16, help="ILP: neurons per decision group (default: 16)")
    q.add_argument("--time-limit", type=float, default=30.0, help="ILP: solver time limit in seconds (default: 30)")
    q.add_argument("--out", default="placement.json", help="plan file to write (default: placement.json)")
    q.add_argument("--curve", default="0.1,0.2,0.3,0.5",
                   help="comma-separated budget fractions to print captured mass for ('' to skip)")
    q.add_argument("--plot", default=None, help="save the captured-mass-vs-budget curve to this image file")
    q.add_argument("--force", action="store_true", help="overwrite --out/--plot if they exist")
    q.set_defaults(func=_place)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h2o_cache.offload.cli", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from h2o_cache.cli import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
