"""The speed half of issue 9's bars: decode and prefill of frontier specs against the full cache, side by side in one
process (``throughput.measure``, i.e. ``h2o_cache.runner.timed_decode``), with the byte share each cache held.

    python -m h2o_cache.eval.frontier_speed --specs full,h2o@0.5+int4,h2o@0.2 --batch 4 --prompt 4096 --gen 256

Prints a markdown table (decode tok/s and prefill time as ratios to the first spec, which should be ``full``) and
writes the records as JSON (``--out``). Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from h2o_cache.runner import fp16_kv_bytes

from . import report
from .frontier import parse_specs
from .memory import machine_info
from .throughput import measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m h2o_cache.eval.frontier_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", default="full,h2o@0.5+int4,h2o@0.2",
                   help="comma-separated frontier specs (see h2o-cache eval --help); the first is the reference")
    p.add_argument("--batch", type=int, default=4, help="sequences (default 4)")
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--gen", type=int, default=256, help="new tokens, exactly (default 256)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per spec, median reported (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--h2o-option", action="append", default=[], metavar="NAME=INT",
                   help="an H2OConfig integer option for every H2O spec (e.g. kv_residual=32); repeatable")
    p.add_argument("--out", default="results/frontier_speed.json", help="JSON output (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        specs = parse_specs([s for s in args.specs.split(",") if s.strip()])
        extra = {}
        for item in args.h2o_option:
            name, sep, value = item.partition("=")
            if not sep or not value.lstrip("-").isdigit():
                raise ValueError(f"--h2o-option expects NAME=INT, got {item!r}")
            extra[name] = int(value)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from h2o_cache.models import load_model

    model, tokenizer = load_model(dtype=args.dtype)
    records = []
    for spec in specs:
        options = spec.options(extra, {})
        rec = measure(model, cache=spec.cache, batch=args.batch, prompt_len=args.prompt, gen=args.gen,
                      budget=spec.budget, tokenizer=tokenizer, warmup=1, repeats=args.repeats, options=options)
        rec["spec"] = spec.name
        if rec.get("kv_bytes"):
            # The cache after the loop has seen the prompt and every new token but the last (never fed back).
            rec["byte_share"] = rec["kv_bytes"] / fp16_kv_bytes(model.config, args.prompt + args.gen - 1, args.batch)
        records.append(rec)
        print(f"{spec.name}: {rec.get('status')} decode {rec.get('decode_tok_s')} tok/s, prefill {rec.get('prefill_s')}"
              f" s, share {rec.get('byte_share')}", flush=True)
    ref = records[0]
    for rec in records:
        if rec.get("status") == "ok" and ref.get("status") == "ok":
            rec["decode_vs_first"] = rec["decode_tok_s"] / ref["decode_tok_s"]
            rec["prefill_vs_first"] = rec["prefill_s"] / ref["prefill_s"]
    table = [{"spec": r["spec"], "byte share": f"{r['byte_share']:.1%}" if r.get("byte_share") else "-",
              "decode tok/s": r.get("decode_tok_s"), "decode x": r.get("decode_vs_first"),
              "prefill s": r.get("prefill_s"), "prefill x": r.get("prefill_vs_first"),
              "status": r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}"}
             for r in records]
    md = report.markdown_table(table, list(table[0]), floatfmt=".2f")
    print(md)
    report.write_json(args.out, {"command": " ".join(["python -m h2o_cache.eval.frontier_speed", *(argv or sys.argv[1:])]),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
                                 "dtype": args.dtype, "records": records, "table": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())
