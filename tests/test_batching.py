"""Micro-batched prefill: concatenated caches equal a whole-batch prefill, and generation continues from them."""

from __future__ import annotations

import pytest
import torch
from fixtures import left_padded, make_model, prompt_ids
from transformers import DynamicCache

from h2o_cache import H2OCache, concatenate_caches, prefill_in_micro_batches
from h2o_cache.compat import cache_kwargs


def padded_batch():
    return left_padded([prompt_ids(1, 40, seed=s)[0][: 40 - 3 * s] for s in range(5)])


@pytest.mark.parametrize("micro_batch", [1, 2, 5])
def test_h2o_micro_batches_equal_the_whole_batch(micro_batch):
    model = make_model("llama")
    ids, mask = padded_batch()
    new = lambda: H2OCache(model.config, heavy_budget=4, recent_budget=4)  # noqa: E731
    whole = new()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **cache_kwargs(whole)).logits[:, -1]
    cache, logits = prefill_in_micro_batches(model, ids, new, micro_batch=micro_batch, attention_mask=mask)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == whole.get_seq_length() and cache.budget() == 8
    for a, b in zip(cache.layers, whole.layers, strict=True):
        for name in ("keys", "values", "scores", "positions", "valid"):
            x, y = getattr(a, name), getattr(b, name)
            if x.dtype == torch.float32:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(x, y), name
    # generate continues from it exactly as from the whole-batch cache
    kw = dict(attention_mask=torch.cat([mask, mask.new_ones(5, 1)], 1), max_new_tokens=6, do_sample=False,
              eos_token_id=None)
    nxt = ref.argmax(-1, keepdim=True)
    a = model.generate(torch.cat([ids, nxt], 1), **cache_kwargs(cache), **kw)
    b = model.generate(torch.cat([ids, nxt], 1), **cache_kwargs(whole), **kw)
    assert torch.equal(a, b)


def test_dynamic_cache_micro_batches_equal_the_whole_batch():
    model = make_model("qwen2")
    ids = prompt_ids(4, 24)
    whole = DynamicCache()
    with torch.no_grad():
        ref = model(ids, **cache_kwargs(whole)).logits[:, -1]
    cache, logits = prefill_in_micro_batches(model, ids, DynamicCache, micro_batch=3)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache.layers, whole.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_concatenation_refuses_what_cannot_be_joined():
    model = make_model("llama")
    new = lambda: H2OCache(model.config, heavy_budget=4, recent_budget=4)  # noqa: E731
    short, long = new(), new()
    with torch.no_grad():
        model(prompt_ids(1, 20), **cache_kwargs(short))
        model(prompt_ids(1, 30), **cache_kwargs(long))
    with pytest.raises(ValueError, match="differ in budget or tokens seen"):
        concatenate_caches([short, long])
    with pytest.raises(ValueError, match="H2OCache objects, or DynamicCache"):
        concatenate_caches([short, DynamicCache()])
    with pytest.raises(ValueError, match="micro_batch must be an integer >= 1"):
        prefill_in_micro_batches(model, prompt_ids(2, 8), new, micro_batch=0)


def test_release_empties_the_sources_layer_by_layer():
    model = make_model("llama")
    parts = []
    for seed in (1, 2):
        for cache in (H2OCache(model.config, heavy_budget=4, recent_budget=4), DynamicCache()):
            with torch.no_grad():
                model(prompt_ids(1, 20, seed=seed), **cache_kwargs(cache))
            parts.append(cache)
    h2o, dyn = parts[0::2], parts[1::2]
    kept = concatenate_caches(h2o)  # without release the sources stay intact
    assert all(layer.is_initialized for c in h2o for layer in c.layers)
    joined = concatenate_caches(h2o, release=True)
    assert all(not layer.is_initialized for c in h2o for layer in c.layers)
    for a, b in zip(joined.layers, kept.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.scores, b.scores)
    joined = concatenate_caches(dyn, release=True)
    assert joined.layers[0].keys.shape[0] == 2 and all(not layer.is_initialized for c in dyn for layer in c.layers)
