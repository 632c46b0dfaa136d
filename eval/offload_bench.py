"""Benchmark of hot/cold FFN offload and layer streaming on the embedded SmolLM2-135M (or --model).

Prints: captured activation mass vs budget (greedy and ILP), exactness of the split model, perplexity and decode
speed of sparse mode vs the dense model, and layer streaming with prefetch vs Accelerate's disk offload. Speeds are
ratios of runs interleaved in this one process (median of --repeats), so machine load hits both sides alike.

    python eval/offload_bench.py                      # full run (profiles first; 5-15 min on 2 busy cores)
    python eval/offload_bench.py --profile prof.pt    # reuse a profile written by `h2o-cache profile`
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch

from h2o_cache import offload
from h2o_cache.compat import cache_kwargs, output_cache
from h2o_cache.models import load_model, reference_text


def perplexity(model, windows) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None], use_cache=False)
            nll += float(out.loss) * (len(w) - 1)
            n += len(w) - 1
    return math.exp(nll / n)


class FFNTimer:
    """Wall time spent inside the FFN modules (pre/post forward hooks)."""

    def __init__(self, modules):
        self.total = 0.0
        self._t = 0.0
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._start))
            self.handles.append(m.register_forward_hook(self._stop))

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t

    def remove(self):
        for h in self.handles:
            h.remove()


def ffn_modules(model):
    return [layer.mlp for layer in model.model.layers]


def decode(model, prompt, new_tokens):
    """(seconds of decode, seconds inside FFNs during decode, tokens) with prefill timed apart."""
    timer = FFNTimer(ffn_modules(model))
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        past, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
        toks = [tok]
        timer.total = 0.0
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, **cache_kwargs(past), use_cache=True)
            past, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
            toks.append(tok)
        dt = time.perf_counter() - t0
    timer.remove()
    return dt, timer.total, torch.cat(toks, 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder/.gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--profile", default=None, help="reuse this profile file instead of profiling")
    ap.add_argument("--profile-tokens", type=int, default=8192, help="tokens to profile on (default 8192)")
    ap.add_argument("--hot", type=float, default=0.1, help="hot budget (fraction of FFN bytes) for the speed runs")
    ap.add_argument("--sparsity", default="0.2,0.3,0.5", help="cold-neuron sparsities to try")
    ap.add_argument("--ppl-windows", type=int, default=8, help="256-token held-out windows for perplexity")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode tokens per speed run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per speed figure (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core box, 2 threads spin at barriers)")
    ap.add_argument("--skip-streaming", action="store_true", help="skip the layer streaming comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")

    model, tok = load_model(args.model)
    text = reference_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Profile/calibrate on the first part of the text, measure perplexity on its last part.
    held_out = list(torch.tensor(ids[-args.ppl_windows * 256:]).view(-1, 256))
    calib = list(torch.tensor(ids[:args.profile_tokens - args.profile_tokens % 256]).view(-1, 256))
    if args.profile:
        prof = offload.NeuronProfile.load(args.profile)
    else:
        prof = offload.profile(model, calib, model_name="smollm2-135m")
    print(f"\n## Captured activation mass ({prof.tokens_seen} profiled tokens, {prof.ffn_bytes()} FFN bytes)")
    print("budget  greedy   ilp(group 16)  ilp(min 128/layer)")
    for f in (0.1, 0.2, 0.3, 0.5):
        b = int(f * prof.ffn_bytes())
        g = offload.place(prof, b).captured
        i = offload.place(prof, b, solver="ilp").captured
        im = offload.place(prof, b, solver="ilp", min_per_layer=128).captured
        print(f"{100 * f:5.0f}%  {100 * g:6.2f}%  {100 * i:6.2f}%        {100 * im:6.2f}%")

    # Exactness.
    window = held_out[0][None]
    prompt = held_out[1][None, :64]
    mlp_io = {}

    def keep(i):
        def hook(_module, args, output):
            mlp_io[i] = (args[0], output)

        return hook

    hooks = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        dense_logits = model(input_ids=window, use_cache=False).logits
    for h in hooks:
        h.remove()
    ppl_dense = perplexity(model, held_out)
    plan = offload.place(prof, int(args.hot * prof.ffn_bytes()))
    offload.dispatch(model, plan)
    report = offload.placement_report(model)
    with torch.no_grad():
        split_logits = model(input_ids=window, use_cache=False).logits
    print(f"\n## Exactness (hot {100 * args.hot:.0f}% of FFN bytes; plan {plan.hot_bytes} B, "
          f"allocated hot {report.get('cpu', 0)} B, cold {report['cold_cpu']} B)")
    with torch.no_grad():
        diffs = [(layer.mlp(mlp_io[i][0]) - mlp_io[i][1]).abs().max().item() for i, layer in
                 enumerate(model.model.layers)]
        scale = max(o.abs().max().item() for _x, o in mlp_io.values())
    print(f"FFN outputs (256 tokens, 30 layers): max |diff| {max(diffs):.3g} (max |output| {scale:.3g}, "
          f"relative {max(diffs) / scale:.2g})")
    print(f"max |logit diff| split vs dense: {(split_logits - dense_logits).abs().max().item():.3g}; "
          f"same argmax: {bool((split_logits.argmax(-1) == dense_logits.argmax(-1)).all())}")

    print(f"\n## Sparse mode (CATS on cold neurons; hot {100 * args.hot:.0f}%), perplexity on "
          f"{len(held_out) * 256} held-out tokens; decode {args.new_tokens} tokens after 64, {torch.get_num_threads()} thread(s)")
    offload.restore(model)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    offload.dispatch(model, plan)
    thresholds = {s: offload.calibrate_thresholds(model, calib[:8], s) for s in sparsities}
    rows = [("dense", None, ppl_dense, None)]
    offload.set_mode(model, "exact")
    rows.append(("hot/cold exact", "exact", perplexity(model, held_out), None))
    for s in sparsities:
        offload.set_mode(model, "sparse", thresholds[s])
        p = perplexity(model, held_out)
        rows.append((f"sparse {s:.0%} of cold", s, p, offload.measured_sparsity(model)))
    # Speed: interleave dense / exact / sparse runs.
    offload.restore(model)
    timings = {r[0]: [] for r in rows}
    outputs = {}
    for _ in range(args.repeats):
        for name, mode, _p, _m in rows:
            if mode is None:
                if hasattr(model, "h2o_offload"):
                    offload.restore(model)
            else:
                if not hasattr(model, "h2o_offload"):
                    offload.dispatch(model, plan)
                offload.set_mode(model, "exact" if mode == "exact" else "sparse",
                                 None if mode == "exact" else thresholds[mode])
            dt, ffn, out = decode(model, prompt, args.new_tokens)
            timings[name].append((dt, ffn))
            outputs[name] = out
    base_dt = statistics.median(t[0] for t in timings["dense"])
    base_ffn = statistics.median(t[1] for t in timings["dense"])
    print("variant               ppl     dppl    skipped  decode tok/s  x dense  FFN ms/tok  FFN x dense  same tokens")
    for name, _mode, p, meas in rows:
        dt = statistics.median(t[0] for t in timings[name])
        ffn = statistics.median(t[1] for t in timings[name])
        n = args.new_tokens - 1
        same = (outputs[name] == outputs["dense"]).float().mean().item()
        sk = f"{100 * meas:6.1f}%" if meas is not None else "      -"
        print(f"{name:20s} {p:7.3f} {100 * (p / ppl_dense - 1):+6.2f}%  {sk}  {n / dt:11.2f}  {base_dt / dt:6.2f}x "
              f"{1000 * ffn / n:10.2f}  {base_ffn / ffn:10.2f}x  {100 * same:6.1f}%")
    if hasattr(model, "h2o_offload"):
        offload.restore(model)

    if args.skip_streaming:
        return
    print("\n## Layer streaming from disk (all 30 layers in per-layer files; page cache warm for both)")
    stream_timings = {"accelerate disk offload": [], "stream, no prefetch": [], "stream + prefetch": []}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(args.repeats):
        for name in stream_timings:
            with tempfile.TemporaryDirectory() as d:
                if name.startswith("accelerate"):
                    from accelerate import dispatch_model
                    from accelerate.hooks import remove_hook_from_submodules

                    dmap = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                            "lm_head": "cpu"}
                    dmap.update({f"model.layers.{i}": "disk" for i in range(len(model.model.layers))})
                    dispatch_model(model, device_map=dmap, main_device="cpu", offload_dir=d)
                    dt, _f, out = decode(model, prompt, args.new_tokens // 2)
                    remove_hook_from_submodules(model)
                    model.load_state_dict(sd, assign=True)
                else:
                    s = offload.stream_layers(model, offload_dir=d, prefetch="prefetch" in name and
                                              "no prefetch" not in name)
                    dt, _f, out = decode(model, prompt, args.new_tokens // 2)
                    s.remove()
                stream_timings[name].append(dt)
                outputs[name] = out
    base = statistics.median(stream_timings["accelerate disk offload"])
    print("variant                   decode tok/s   x accelerate   same tokens as dense")
    n = args.new_tokens // 2 - 1
    for name, ts in stream_timings.items():
        dt = statistics.median(ts)
        same = torch.equal(outputs[name], outputs["dense"][:, : n + 1])
        print(f"{name:25s} {n / dt:12.2f}   {base / dt:10.2f}x   {same}")


if __name__ == "__main__":
    main()
