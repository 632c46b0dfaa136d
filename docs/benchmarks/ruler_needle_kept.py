"""Which of a niah_single_1 needle's tokens an H2O cache at 50% keeps after the prefill, per layer (docs/benchmarks/ruler.md).

Run: .venv/bin/python docs/benchmarks/ruler_needle_kept.py  (SmolLM2-135M, fp32, ~20 s a sample on one thread)
"""
import torch

from h2o_cache.compat import cache_kwargs
from h2o_cache.eval import ruler
from h2o_cache.eval.caches import make_cache
from h2o_cache.models import load_model

torch.set_num_threads(1)
model, tok = load_model()
docs = ruler._Tasks(ruler.tokenizer_folder(tok)).get("niah_single_1", 4096).eval_docs
for i in (1, 2, 4):  # depths 0.44, 0.16, 0.12
    doc = docs[i]
    text = doc["input"] + doc.get("gen_prefix", "")
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    start = doc["input"].find(doc["outputs"][0])
    end = start + len(doc["outputs"][0])
    offs = enc.offset_mapping[0]
    needle = [j for j, (a, b) in enumerate(offs.tolist()) if a < end and b > start]
    ids = enc.input_ids
    cache, _ = make_cache("h2o", model, 0.5, ids.shape[1])
    with torch.inference_mode():
        model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    kept = []
    for layer in cache.layers:
        pos = layer._materialised_positions()[0]  # [H, S]
        kept.append([int(sum((pos[h] == j).any() for j in needle)) for h in range(pos.shape[0])])
    print(f"doc {i} depth {ruler.needle_depth(doc):.2f} needle tokens {len(needle)} of {ids.shape[1]}; "
          f"kept per layer (min..max over KV heads): " + " ".join(f"{min(k)}-{max(k)}" for k in kept))
