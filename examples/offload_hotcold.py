"""Hot/cold FFN offload in a few lines: profile, place, dispatch, generate, restore.

    python examples/offload_hotcold.py                       # embedded SmolLM2-135M, 30% of FFN bytes hot
    python examples/offload_hotcold.py --tiny --profile-tokens 256 --new-tokens 4   # seconds, random tiny model
    python examples/offload_hotcold.py --sparsity 0.5        # also skip half of the cold activations (CATS)
    python examples/offload_hotcold.py --h2o                 # ... and decode with the H2O KV cache

With CUDA, pass --gpu-memory 1GiB: the hot neurons go to the GPU under that budget, the cold ones are computed
on the CPU.
"""

import argparse

import torch

from h2o_cache import offload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="use a tiny random Llama (no text, no download)")
    ap.add_argument("--budget", type=float, default=0.3, help="hot share of FFN bytes (default 0.3)")
    ap.add_argument("--profile-tokens", type=int, default=4096, help="tokens to profile on (default 4096)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    ap.add_argument("--sparsity", type=float, default=0.0, help="share of cold activations to skip (default 0)")
    ap.add_argument("--gpu-memory", default=None, help="with CUDA: GPU budget for max_memory, e.g. 1GiB")
    ap.add_argument("--h2o", action="store_true", help="decode with the H2O KV cache as well")
    args = ap.parse_args(argv)

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
        windows = list(torch.randint(3, 128, (max(args.profile_tokens // 64, 1), 64)))
        prompt = torch.randint(3, 128, (1, 24))
    else:
        from h2o_cache.models import load_model

        model, tok = load_model()
        windows = offload.token_windows(tok, offload.read_texts(), 256, args.profile_tokens)
        prompt = tok("The with statement is used to", return_tensors="pt").input_ids

    # 1. Profile and place.
    prof = offload.profile(model, windows)
    plan = offload.place(prof, int(args.budget * prof.ffn_bytes()))
    print(f"hot: {plan.hot_bytes / 2**20:.1f} MiB of {plan.ffn_bytes / 2**20:.1f} MiB FFN, "
          f"captures {100 * plan.captured:.1f}% of the activation mass")

    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        dense = model.generate(prompt, **gen)

    # 2. Dispatch: hot neurons as parameters placed by Accelerate, cold ones computed on the CPU.
    max_memory = {0: args.gpu_memory, "cpu": "64GiB"} if args.gpu_memory and torch.cuda.is_available() else None
    offload.dispatch(model, plan, max_memory=max_memory)
    print("bytes by device:", offload.placement_report(model))
    if args.sparsity > 0:
        offload.set_mode(model, "sparse", offload.calibrate_thresholds(model, windows[:4], args.sparsity))

    if args.h2o:
        from h2o_cache import H2OCache

        gen["past_key_values"] = H2OCache(model.config, heavy_budget=8, recent_budget=8)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(prompt.to(device), **gen).cpu()
    same = (out == dense).float().mean().item()
    print(f"generated {out.shape[1] - prompt.shape[1]} tokens; {100 * same:.0f}% equal to the dense model's")
    if args.sparsity > 0:
        print(f"cold activations skipped: {100 * offload.measured_sparsity(model):.1f}%")

    # 3. Back to the dense model.
    offload.restore(model)
    return out


if __name__ == "__main__":
    main()
