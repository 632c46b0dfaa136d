"""The evaluation subcommands of ``h2o-cache``: ``eval`` (quality), ``bench`` (throughput) and ``lm-eval``
(lm-eval's own command line with the ``h2o`` model registered).

``h2o_cache.cli`` hands these commands over here without importing this package at start-up. Each command only
turns its options into a call of the API (``quality.evaluate``, ``bench.ThroughputSpec``/``run_benchmark``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from h2o_cache.cli import add_model_options
from h2o_cache.config import (
    GQA_AGGREGATIONS,
    KV_BITS,
    KV_KEY_AXES,
    LAYER_BUDGETS,
    SCORE_NORMALIZATIONS,
    H2OConfig,
)

from . import bench, frontier, quality, throughput
from .caches import ALL_POLICIES

COMMANDS = {
    "eval": "quality of H2O vs the full cache and other eviction policies (perplexity, retrieval, lm-eval)",
    "bench": "throughput/memory benchmark: H2O vs the full cache and the offloading baselines",
    "lm-eval": "lm-eval's own command line, with --model h2o (every H2O option a --model_args key)",
    "ruler": "RULER's offline synthetic tasks through lm-eval, per cache, policy and budget (resumable)",
}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = _strs(text)
        bad = [x for x in names if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return names

    return parse


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--tasks", type=_strs, default=list(quality.TASKS),
                        help=f"comma-separated tasks among {','.join(quality.TASKS)} (default: all)")
    parser.add_argument("--policies", type=_strs, default=list(quality.DEFAULT_POLICIES),
                        help=f"comma-separated policies among {','.join(ALL_POLICIES)} (default: all)")
    parser.add_argument("--budgets", type=_floats, default=list(quality.DEFAULT_BUDGETS),
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
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                        help="H2O: store the kept keys/values as packed integers of this many bits (default: the "
                             "model's dtype); with --frontier, bits come from each spec instead")
    parser.add_argument("--kv-group-size", type=int, default=None,
                        help="H2O quantisation: values per scale (channels per token; tokens per key channel with "
                             "--kv-key-axis channel) (default: the cache's, 32)")
    parser.add_argument("--kv-key-axis", choices=KV_KEY_AXES, default=None,
                        help="H2O quantisation: keys per channel (KIVI) or per token (default: the cache's, channel)")
    parser.add_argument("--kv-residual", type=int, default=None,
                        help="H2O quantisation: newest tokens kept in full precision (default: the cache's, 32)")
    parser.add_argument("--layer-budgets", choices=LAYER_BUDGETS, default=None,
                        help="H2O: share the total budget equally over the layers (uniform) or as a PyramidKV ramp, "
                             "lower layers more, same total (pyramid) (default: uniform)")
    parser.add_argument("--pyramid-slope", type=float, default=None,
                        help="H2O --layer-budgets pyramid: the first layer keeps 1+slope times the mean budget, the "
                             "last 1-slope times; in [0, 1) (default: the cache's)")
    parser.add_argument("--frontier", action="store_true",
                        help="quality against the share of fp16 KV bytes (issue 9's frontier) for the --specs "
                             "instead of the policy x budget grid: writes frontier.json, frontier.md and "
                             "frontier.png (x = byte share, log scale; a line per method) into --output")
    parser.add_argument("--specs", type=_strs, default=list(frontier.DEFAULT_SPECS),
                        help="--frontier: comma-separated configurations FAMILY[@BUDGET][+intBITS], FAMILY one of "
                             f"{','.join(frontier.FAMILIES)}; an evicting policy takes @BUDGET (fraction of the "
                             "prompt); keep_all is our quantisation alone; quanto/hqq are transformers' "
                             "QuantizedCache with that backend (e.g. full,h2o@0.2,h2o@0.64+int4,keep_all+int4,"
                             "quanto+int4,streaming@0.2) (default: the whole frontier, %(default)s)")
    parser.add_argument("--quant-residual", type=int, default=None,
                        help="--frontier, quanto/hqq: QuantizedCache's residual_length, newest tokens kept in full "
                             "precision (default: transformers', 128)")
    parser.add_argument("--quant-group-size", type=int, default=None,
                        help="--frontier, quanto/hqq: QuantizedCache's q_group_size (default: transformers', 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the retrieval keys and the random policy")
    parser.add_argument("--output", default="results/quality", help="results folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")


def run_eval(args: argparse.Namespace) -> int:
    from h2o_cache.models import load_model

    from . import quality
    from .quality_report import write_report
    from .texts import load_text

    if args.threads:
        torch.set_num_threads(args.threads)
    h2o_options = {k: v for k, v in (("gqa_aggregation", args.gqa_aggregation),
                                     ("score_normalization", args.score_normalization),
                                     ("sink_tokens", args.sink_tokens), ("kv_group_size", args.kv_group_size),
                                     ("kv_key_axis", args.kv_key_axis), ("kv_residual", args.kv_residual),
                                     ("layer_budgets", args.layer_budgets), ("pyramid_slope", args.pyramid_slope))
                   if v is not None}
    if args.seed:
        h2o_options["seed"] = args.seed
    H2OConfig(**h2o_options)  # a bad option is one error line before the model loads
    if args.frontier:
        return run_frontier(args, h2o_options)
    if args.kv_bits is not None:
        h2o_options["kv_bits"] = args.kv_bits
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
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                  device=args.device)
    results = quality.evaluate(
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


def run_frontier(args: argparse.Namespace, h2o_options: dict) -> int:
    """``h2o-cache eval --frontier``: every spec checked before the model loads, then ``evaluate_frontier``."""
    from h2o_cache.models import load_model

    from .frontier_report import write_frontier_report
    from .report import write_json
    from .texts import load_text

    frontier.parse_specs(args.specs)
    tasks = args.tasks if args.tasks_given else list(frontier.TASKS)
    unknown = [t for t in tasks if t not in frontier.TASKS]
    if unknown:
        raise ValueError(f"tasks: {unknown} not supported; choose from {list(frontier.TASKS)}")
    quantized_options = {k: v for k, v in (("residual_length", args.quant_residual),
                                           ("q_group_size", args.quant_group_size)) if v is not None}
    text = load_text(args.text) if args.text else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                  device=args.device)
    results = frontier.evaluate_frontier(
        model, tokenizer, specs=args.specs, tasks=tasks, text=text, prompt_len=args.prompt_len, gen_len=args.gen_len,
        windows=args.windows, retrieval_lengths=args.retrieval_lengths, retrieval_depths=args.retrieval_depths,
        retrieval_samples=args.retrieval_samples, lm_eval_tasks=args.lm_eval_tasks, lm_eval_limit=args.lm_eval_limit,
        h2o_options=h2o_options, quantized_options=quantized_options, seed=args.seed,
        model_name=args.model or "embedded SmolLM2-135M-Instruct", progress=not args.no_progress,
        on_spec=lambda rows: write_json(Path(args.output) / "frontier.partial.json", {"rows": rows}))
    results["settings"]["command"] = " ".join(["h2o-cache eval", *args.argv])
    paths = write_frontier_report(results, args.output)
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--prompt-lens", type=_ints, default=[512, 1024, 2048, 4096],
                   help="comma-separated prompt lengths of the grid (default 512,1024,2048,4096)")
    p.add_argument("--batches", type=_ints, default=[1, 4], help="comma-separated batch sizes of the grid")
    p.add_argument("--budgets", type=_floats, default=[0.2],
                   help="comma-separated H2O budgets as fractions of the prompt (half heavy, half recent); "
                        "> 1 keeps every token (default 0.2)")
    p.add_argument("--caches", type=_names(throughput.CACHES), default=["full", "h2o", "offloaded", "quantized"],
                   help=f"comma-separated caches of the grid, from {list(throughput.CACHES)}")
    p.add_argument("--gen", type=int, default=256, help="new tokens per sequence, exactly (EOS ignored)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs (small shapes) before each configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    p.add_argument("--targets", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the target configuration (full cache, H2O 20%%, H2O budget >= length) and check "
                        "the acceptance targets")
    p.add_argument("--target-prompt", type=int, default=4096, help="prompt length of the target configuration")
    p.add_argument("--target-batch", type=int, default=4, help="batch of the target configuration")
    p.add_argument("--full-budget", type=float, default=1.1,
                   help="H2O budget (fraction of prompt) used as 'budget >= length' (default 1.1: no eviction)")
    p.add_argument("--same-memory-gib", type=float, default=0.0,
                   help="memory budget (GiB) of the same-memory comparison; 0 = the full cache's measured peak at "
                        "the target configuration (+2%%); negative disables it")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the same-memory search tries")
    p.add_argument("--prefill-micro-batch", type=int, default=0,
                   help="prefill this many sequences at a time and decode the whole batch together (FlexGen's "
                        "schedule; h2o_cache.prefill_in_micro_batches), for the full and the H2O cache alike; "
                        "0 = the whole batch at once (default)")
    p.add_argument("--probe-steps", type=int, default=2,
                   help="decode steps of a memory probe; the full cache's growth over the remaining steps is added")
    p.add_argument("--systems", type=_names(throughput.SYSTEMS), default=list(throughput.SYSTEMS),
                   help=f"comma-separated baseline systems, from {list(throughput.SYSTEMS)} (empty string: none)")
    p.add_argument("--baseline-prompt", type=int, default=None,
                   help="prompt length of the baseline systems (default: --target-prompt)")
    p.add_argument("--baseline-gen", type=int, default=None, help="new tokens of the baseline systems (default --gen)")
    p.add_argument("--offload-fraction", type=float, default=0.5,
                   help="fraction of decoder layers Accelerate offloads (to disk on CPU, to CPU RAM on GPU)")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="buffer size of the copy microbenchmark")
    p.add_argument("--text-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="prompts from real text (the Python reference); --no-text-prompts uses random ids")
    p.add_argument("--out", default="bench_out", help="output folder for throughput.json/.md and the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    names = {f.name for f in dataclasses.fields(bench.ThroughputSpec)} - {"command"}
    spec = bench.ThroughputSpec(**{k: v for k, v in vars(args).items() if k in names},
                                     command=" ".join(["h2o-cache bench", *argv]))
    results = bench.run_benchmark(spec)
    print(Path(results["outputs"]["markdown"]).read_text())
    return 0


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """lm-eval's own ``lm_eval`` command line, with the ``h2o`` model registered first."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: h2o-cache lm-eval needs lm-eval: pip install 'h2o-cache[eval]'", file=sys.stderr)
        return 2
    from .lm_eval_model import register

    register()
    text = " ".join(argv)
    if "cache_implementation=h2o" in text and "--model h2o" not in text:
        print("warning: --gen_kwargs cache_implementation=h2o compresses generate_until tasks only; loglikelihood "
              "and multiple-choice tasks still run uncompressed (one forward, no cache). Use --model h2o "
              "--model_args pretrained=DIR,... to run every task through the cache.", file=sys.stderr)
    old = sys.argv
    sys.argv = ["h2o-cache lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0


def main(command: str, argv: Sequence[str]) -> int:
    """Run ``h2o-cache COMMAND ARGV...`` for one of ``COMMANDS``."""
    if command == "lm-eval":
        return run_lm_eval_cli(argv)
    if command == "ruler":
        from .ruler import main as ruler_main

        return ruler_main(argv)
    parser = argparse.ArgumentParser(prog=f"h2o-cache {command}", description=COMMANDS[command])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    (add_eval_arguments if command == "eval" else add_bench_arguments)(parser)
    args = parser.parse_args(list(argv))
    args.argv = list(argv)
    args.tasks_given = any(a == "--tasks" or a.startswith("--tasks=") for a in argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_eval(args) if command == "eval" else run_bench(args, argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
