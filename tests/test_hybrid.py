"""Hybrid models (sliding-window + full-attention layers), attention sinks and logit softcapping.

Per hybrid family (tiny random configs, see ``HYBRID_FAMILIES`` in tests/fixtures.py): exact at full budget
against the model's own ``DynamicCache(config)``, eviction at 20% bounded on the full layers, a left-padded batch
equal to each row alone, beam search. Then the pieces one by one: the scoring attention against the models' own
eager attention with softcapping and sinks, which layers reach H2O's attention, chunked prefill, micro-batched
prefill, and the configs still refused. ``tests/support_matrix.py`` turns the per-family checks into
docs/SUPPORT.md.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from fixtures import (
    HYBRID_FAMILIES,
    NEW,
    PROMPT,
    check_hybrid_beams,
    check_hybrid_eviction,
    check_hybrid_exact,
    check_hybrid_padded,
    greedy,
    make_model,
    max_logit_diff,
    prompt_ids,
)
from transformers import DynamicCache

import h2o_cache
from h2o_cache import H2OCache
from h2o_cache.scoring import attention_with_mass, mass_from_weights
from h2o_cache.support import check_model_config

CASES = [(family, attn) for family, (*_, backends) in HYBRID_FAMILIES.items() for attn in backends]


@pytest.mark.parametrize("family, attn", CASES)
def test_exact_at_full_budget(family, attn):
    check_hybrid_exact(family, attn)


@pytest.mark.parametrize("family", sorted(HYBRID_FAMILIES))
def test_eviction_at_20_percent_is_bounded_on_full_layers(family):
    check_hybrid_eviction(family, HYBRID_FAMILIES[family][4][0])


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gpt_oss", "qwen2 (use_sliding_window)"])
def test_left_padded_batch_equals_each_row_alone(family):
    check_hybrid_padded(family, HYBRID_FAMILIES[family][4][0])


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_beam_search(family):
    check_hybrid_beams(family, HYBRID_FAMILIES[family][4][0])


# ---- the scoring attention against the models' own eager attention --------------------------------------------
def _inputs(bsz=2, hq=4, hkv=2, q_len=5, k_len=9, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, q_len, dim, generator=g) * 2
    k = torch.randn(bsz, hkv, k_len, dim, generator=g) * 2
    v = torch.randn(bsz, hkv, k_len, dim, generator=g)
    valid = torch.ones(bsz, hkv, k_len, dtype=torch.bool)
    valid[1, :, :3] = False  # row 1: three left pads
    past = k_len - q_len
    allowed = torch.arange(k_len)[None, :] <= (past + torch.arange(q_len))[:, None]  # [q, k]
    allowed = allowed[None, None] & valid[:, :1, None, :]
    additive = torch.zeros(bsz, 1, q_len, k_len).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return q, k, v, valid, additive


def _module(hq, hkv, dim, **attrs):
    return types.SimpleNamespace(num_key_value_groups=hq // hkv, training=False, head_dim=dim, **attrs)


@pytest.mark.parametrize("chunk", [None, 2])
def test_softcap_matches_gemma2_eager_attention(chunk):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, valid, additive = _inputs()
    cap = 1.5  # small enough that tanh bends the logits (they reach ~10)
    ref_out, ref_w = eager_attention_forward(_module(4, 2, 8), q, k, v, additive, scaling=0.5, softcap=cap)
    out, mass = attention_with_mass(q, k, v, scaling=0.5, key_valid=valid, chunk_size=chunk, softcap=cap)
    assert (out - ref_out).abs().max() < 1e-5
    assert (mass - mass_from_weights(ref_w, 2, None, "mean")).abs().max() < 1e-5
    # Without the cap the output differs clearly: the test can tell.
    plain, _ = attention_with_mass(q, k, v, scaling=0.5, key_valid=valid, chunk_size=chunk)
    assert (plain - ref_out).abs().max() > 1e-2


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_sinks_match_gpt_oss_eager_attention(chunk, aggregation):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v, valid, additive = _inputs()
    sinks = torch.tensor([3.0, -1.0, 0.5, 6.0])  # per query head; large ones take much of the softmax
    ref_out, ref_w = eager_attention_forward(_module(4, 2, 8, sinks=sinks), q, k, v, additive, scaling=0.5)
    out, mass = attention_with_mass(q, k, v, scaling=0.5, key_valid=valid, chunk_size=chunk, sinks=sinks,
                                    aggregation=aggregation)
    assert (out - ref_out).abs().max() < 1e-5
    # The mass is the attention the model computed: the sink's share is in the denominator, credited to no token.
    assert (mass - mass_from_weights(ref_w, 2, None, aggregation)).abs().max() < 1e-5
    if aggregation == "mean":
        assert (mass.sum(-1) < q.shape[2] - 0.1).all()


# ---- which layers reach H2O, and through which paths ------------------------------------------------------------
def test_only_full_layers_reach_h2o_attention(monkeypatch):
    from h2o_cache.patches import attention as patched

    seen = []
    original = patched.h2o_attention

    def counting(layer, *args, **kwargs):
        seen.append(layer.layer_idx)
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(patched, "h2o_attention", counting)
    model = make_model("gemma3", "sdpa")
    cache = H2OCache(model.config, heavy_budget=4, recent_budget=4)
    greedy(model, prompt_ids(), new_tokens=5, past_key_values=cache)
    assert set(seen) == {1} and len(seen) == 5  # the full layer, once per forward (prefill + 4 decode steps)
    assert not any(getattr(layer, "awaiting_attention", False) for layer in cache.layers)


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_chunked_prefill_exact_at_full_budget(family):
    model = make_model(family, HYBRID_FAMILIES[family][4][0])
    ids = prompt_ids()
    # Against the default cache under the same chunked call: transformers 5.2's own chunked prefill of a hybrid
    # model differs from its unchunked one (fixed by 5.24), and H2O must match what the model does.
    ref = greedy(model, ids, new_tokens=8, past_key_values=DynamicCache(config=model.config), prefill_chunk_size=16)
    cache = H2OCache(model.config, heavy_ratio=1.0, recent_ratio=1.0, prompt_length=PROMPT)
    out = greedy(model, ids, new_tokens=8, past_key_values=cache, prefill_chunk_size=16)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-5


def test_micro_batched_prefill_equals_whole_batch():
    model = make_model("gemma3", "sdpa")
    ids = prompt_ids(batch=3)

    def new_cache():
        return H2OCache(model.config, heavy_budget=4, recent_budget=4)

    whole = new_cache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=whole, use_cache=True)
    joined, _ = h2o_cache.prefill_in_micro_batches(model, ids, new_cache, micro_batch=2)
    assert joined.layer_plan == whole.layer_plan and joined.get_seq_length() == PROMPT
    for a, b in zip(joined.layers, whole.layers, strict=True):
        assert type(a) is type(b) and a.keys.shape == b.keys.shape
        assert (a.keys - b.keys).abs().max() < 1e-5
    assert joined.kv_bytes_by_type() == whole.kv_bytes_by_type()


def test_every_layer_sliding_gets_no_h2o_layer_and_says_so(caplog):
    model = make_model("mistral (sliding_window)", "sdpa")
    with caplog.at_level(logging.WARNING, logger="h2o_cache.cache"):
        cache = H2OCache(model.config, heavy_budget=4, recent_budget=4)
    assert "no full-attention layer" in caplog.text and "sliding_window = None" in caplog.text
    assert cache.layer_plan == [("sliding_attention", 8)] * 2 and cache.budget() is None


def test_kv_bytes_and_stats_per_layer_type():
    model = make_model("gemma3", "sdpa")
    out = greedy(model, prompt_ids(), past_key_values=H2OCache(model.config, heavy_budget=4, recent_budget=4))
    stats = out.past_key_values.stats()
    assert stats["layer_types"] == {"sliding_attention": 1, "full_attention": 1}
    slot = 2 * 2 * 16 * 4 * 2  # batch x KV heads x head_dim x float32 x (keys + values)
    bookkeeping = 9 * 2 * 2 * (4 + 4)  # slots x batch x KV heads x (float32 score + int32 position)
    assert stats["kv_bytes_by_type"] == {"sliding_attention": 7 * slot, "full_attention": 9 * slot + bookkeeping}
    assert stats["kv_bytes"] == 16 * slot + bookkeeping and stats["tokens_seen"] == PROMPT + NEW - 1


def test_unsupported_layer_types_are_refused_with_their_names():
    config = types.SimpleNamespace(model_type="llama", num_hidden_layers=2,
                                   layer_types=["linear_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"\['linear_attention'\]"):
        check_model_config(config)
    config = types.SimpleNamespace(model_type="llama", num_hidden_layers=2, sliding_window=0,
                                   layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="sliding_window=0"):
        check_model_config(config)


def test_a_cache_built_without_the_config_is_refused_on_a_sliding_layer():
    model = make_model("gemma3", "sdpa")
    with pytest.raises(ValueError, match=r"sliding-window or chunked layers: create the H2OCache with its config"):
        greedy(model, prompt_ids(), new_tokens=2, past_key_values=H2OCache(heavy_budget=4, recent_budget=4))
    other = make_model("llama", "sdpa")
    with pytest.raises(ValueError, match="created for a model with other layer types"):
        greedy(model, prompt_ids(), new_tokens=2,
               past_key_values=H2OCache(other.config, heavy_budget=4, recent_budget=4))
    # A bare forward has no generate() to check the cache: the sliding layer's attention call refuses it.
    with torch.no_grad(), pytest.raises(ValueError, match=r"received sliding-window attention.*H2OCache\(model.config"):
        model(input_ids=prompt_ids(), past_key_values=H2OCache(heavy_budget=4, recent_budget=4), use_cache=True)


def test_reset_empties_window_layers_too():
    # transformers 5.2's own window layer reset zeroes its tensors in place and keeps their length.
    model = make_model("gemma3", "sdpa")
    cache = H2OCache(model.config, heavy_budget=4, recent_budget=4)
    first = greedy(model, prompt_ids(), new_tokens=4, past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0
    again = greedy(model, prompt_ids(), new_tokens=4, past_key_values=cache)
    assert torch.equal(first.sequences, again.sequences)
