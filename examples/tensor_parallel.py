"""H2O under transformers' tensor parallelism: each rank holds the KV heads of its shard of the attention.

    torchrun --nproc-per-node 4 examples/tensor_parallel.py --model path/to/saved/model     # GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model path/to/tiny/model      # CPU (gloo)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/tensor_parallel.py --model ...                                              # several nodes

The number of ranks must divide the model's number of KV heads (transformers' TP fails otherwise, with or
without H2O). Every rank runs the same generate call and gets the same tokens; the cache needs nothing special.
"""

import argparse

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

import h2o_cache  # noqa: F401  (registers cache_implementation="h2o")
from h2o_cache.compat import output_cache
from h2o_cache.models import reference_text

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="saved transformers model folder (with its tokenizer)")
parser.add_argument("--prompt-tokens", type=int, default=1024)
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("--heavy-ratio", type=float, default=0.1)
parser.add_argument("--recent-ratio", type=float, default=0.1)
args = parser.parse_args()

# from_pretrained initialises the process group from torchrun's environment (NCCL on CUDA, gloo on CPU).
model = AutoModelForCausalLM.from_pretrained(args.model, distributed_config=DistributedConfig(tp_plan="auto"))
tokenizer = AutoTokenizer.from_pretrained(args.model)
ids = tokenizer(reference_text()[: args.prompt_tokens * 8], return_tensors="pt").input_ids[:, : args.prompt_tokens]
ids = ids.to(model.device)

out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False,
                     cache_implementation="h2o",
                     cache_config={"heavy_ratio": args.heavy_ratio, "recent_ratio": args.recent_ratio},
                     return_dict_in_generate=True)
cache = output_cache(out)
rank = dist.get_rank() if dist.is_initialized() else 0
print(f"rank {rank}: KV heads here {cache.layers[0].keys.shape[1]}, kept {cache.tokens_kept()} of "
      f"{cache.get_seq_length()} tokens, KV bytes on this rank {cache.kv_bytes()}")
if rank == 0:
    print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
