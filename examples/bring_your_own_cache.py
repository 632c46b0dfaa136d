"""Bring your own Cache object: build an H2OCache, generate, then continue the conversation on the same cache.

    python examples/bring_your_own_cache.py --heavy-budget 64 --recent-budget 64
"""

import argparse

import torch

from h2o_cache import H2OCache, H2OConfig
from h2o_cache.models import load_model, reference_text

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="model folder or .gguf file (default: embedded SmolLM2)")
parser.add_argument("--heavy-budget", type=int, default=64, help="heavy-hitter slots per head")
parser.add_argument("--recent-budget", type=int, default=64, help="recent-window slots per head")
parser.add_argument("--policy", default="h2o", help="h2o, h2o_no_recent, local, streaming or random")
parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length taken from the Python docs")
parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per turn")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
config = H2OConfig(heavy_budget=args.heavy_budget, recent_budget=args.recent_budget, policy=args.policy)
cache = H2OCache(model.config, config)

text = reference_text()
ids = tokenizer(text[: args.prompt_tokens * 8], return_tensors="pt").input_ids[:, : args.prompt_tokens]
with torch.inference_mode():
    first = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                           max_new_tokens=args.max_new_tokens, do_sample=False)
    print("turn 1:", tokenizer.decode(first[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"  cache holds {cache.tokens_kept()} of {cache.get_seq_length()} tokens, {cache.kv_bytes()} bytes")

    # A second turn feeds the whole conversation; generate only runs the tokens the cache has not seen.
    follow_up = tokenizer("\n\nIn short,", return_tensors="pt").input_ids
    conversation = torch.cat([first, follow_up], dim=1)
    second = model.generate(conversation, attention_mask=torch.ones_like(conversation), past_key_values=cache,
                            max_new_tokens=args.max_new_tokens, do_sample=False)
    print("turn 2:", tokenizer.decode(second[0, conversation.shape[1]:], skip_special_tokens=True))
    print(f"  cache holds {cache.tokens_kept()} of {cache.get_seq_length()} tokens, {cache.kv_bytes()} bytes")
