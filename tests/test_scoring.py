"""The chunked scoring path against materialised (eager-style) attention."""

import pytest
import torch
from fixtures import eager_reference
from transformers import DynamicCache

from h2o_cache import H2OCache
from h2o_cache.config import DEFAULT_PREFILL_CHUNK_BYTES
from h2o_cache.scoring import attention_with_mass, chunk_size_for, mass_from_weights


@pytest.mark.parametrize("q_len, k_len, chunk", [(1, 9, None), (7, 7, 3), (5, 12, 2), (16, 16, 16), (16, 16, 1)])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
def test_output_and_mass_match_eager(q_len, k_len, chunk, hq, hkv):
    torch.manual_seed(0)
    q = torch.randn(2, hq, q_len, 8)
    k, v = torch.randn(2, hkv, k_len, 8), torch.randn(2, hkv, k_len, 8)
    key_valid = torch.ones(2, hkv, k_len, dtype=torch.bool)
    key_valid[1, :, 1] = False  # a padded key (every query still sees key 0)
    out, mass = attention_with_mass(q, k, v, scaling=0.3, key_valid=key_valid, chunk_size=chunk)
    ref_out, probs = eager_reference(q, k, v, 0.3, key_valid)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    expected = mass_from_weights(probs, hkv, None, "mean")
    torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(mass[1, :, 1] == 0)


def test_max_aggregation_and_padding_queries():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    query_valid = torch.tensor([[False, False, True, True, True, True]])
    _, mass = attention_with_mass(q, k, v, scaling=0.5, query_valid=query_valid, chunk_size=4, aggregation="max")
    _, probs = eager_reference(q, k, v, 0.5)
    expected = mass_from_weights(probs, 2, query_valid, "max")
    torch.testing.assert_close(mass, expected, atol=1e-6, rtol=1e-5)


def test_padding_rows_of_a_backend_may_hold_nan():
    # fp16 eager turns a fully masked row into softmax(-inf, ...) = NaN; those rows must simply not count.
    weights = torch.rand(1, 2, 4, 4).softmax(-1)
    weights[:, :, :2] = float("nan")
    query_valid = torch.tensor([[False, False, True, True]])
    mass = mass_from_weights(weights, 1, query_valid, "mean")
    torch.testing.assert_close(mass, mass_from_weights(weights[:, :, 2:], 1, None, "mean"))


def test_chunk_size_bounds_the_block():
    assert chunk_size_for(4, 9, 4096, 64 * 2**20) * 4 * 9 * 4096 * 4 <= 64 * 2**20
    assert chunk_size_for(64, 64, 10**6, 1) == 1
    # The default keeps a block cache-sized: batch 4 x 9 heads x 4096 keys gets 14 queries (8 MiB).
    assert chunk_size_for(4, 9, 4096, DEFAULT_PREFILL_CHUNK_BYTES) == 14
    assert chunk_size_for(1, 9, 512, DEFAULT_PREFILL_CHUNK_BYTES) == 128


def test_chunk_bytes_default_depends_on_the_device():
    from h2o_cache.config import H2OConfig

    config = H2OConfig()
    assert config.chunk_bytes("cpu") == DEFAULT_PREFILL_CHUNK_BYTES
    # A 32k prompt of Llama-3-8B (32 heads) on a GPU gets 64 queries per chunk, not 2 (half a million launches).
    assert chunk_size_for(1, 32, 32768, config.chunk_bytes("cuda")) == 64
    assert H2OConfig(prefill_chunk_bytes=2**20).chunk_bytes("cuda") == 2**20
    with pytest.raises(ValueError, match="prefill_chunk_bytes"):
        H2OConfig(prefill_chunk_bytes=0)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_scores_equal_eager_column_sums(tiny_llama, attn, padded):
    """The scores a prompt leaves in the cache are the column sums of the model's own causal softmax.

    Unpadded sdpa on CPU takes output and scores from one chunked pass; padded sdpa runs the backend for the
    output and a scores-only chunked pass; eager returns its weights, which are summed directly.
    """
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 24))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0  # left padding
    tiny_llama.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tiny_llama(ids, attention_mask=mask, past_key_values=DynamicCache(), output_attentions=True)
    tiny_llama.set_attn_implementation(attn)
    cache = H2OCache(tiny_llama.config, heavy_budget=100, recent_budget=100, prefill_chunk_size=5)
    with torch.no_grad():
        out = tiny_llama(ids, attention_mask=mask, past_key_values=cache)
    real = mask.bool()  # outputs at padding positions are meaningless in every backend
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    for layer, weights in zip(cache.layers, ref.attentions, strict=True):
        expected = mass_from_weights(weights, 2, mask.bool(), "mean")
        torch.testing.assert_close(layer.scores, expected, atol=1e-5, rtol=1e-5)
        if padded:
            assert not layer.valid[0, :, :5].any() and layer.valid[0, :, 5:].all() and layer.valid[1].all()
        else:
            assert layer.valid is None
