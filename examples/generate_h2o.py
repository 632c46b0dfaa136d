"""Minimal H2O generation: turn the cache on with one generate argument.

    python examples/generate_h2o.py                      # embedded SmolLM2-135M, 20% KV budget
    python examples/generate_h2o.py --model path/to/model --prompt-tokens 4096
"""

import argparse

import h2o_cache  # noqa: F401  (registers cache_implementation="h2o")
from h2o_cache.models import load_model, reference_text

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="model folder or .gguf file (default: embedded SmolLM2)")
parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length taken from the Python docs")
parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
ids = tokenizer(reference_text()[: args.prompt_tokens * 8], return_tensors="pt").input_ids[:, : args.prompt_tokens]

out = model.generate(
    ids,
    attention_mask=ids.new_ones(ids.shape),
    max_new_tokens=args.max_new_tokens,
    do_sample=False,
    cache_implementation="h2o",
    cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1},  # 10% heavy hitters + 10% recent tokens
    return_dict_in_generate=True,
)
cache = out.past_key_values
print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
print(f"kept {cache.tokens_kept()} of {cache.get_seq_length()} tokens per head; KV bytes: {cache.kv_bytes()}")
