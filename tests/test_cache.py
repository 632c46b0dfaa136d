"""H2OLayer bookkeeping against a naive per-(sequence, head) H2O written with Python loops."""

import json

import pytest
import torch
from fixtures import greedy
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, GenerationConfig

import h2o_cache
from h2o_cache import H2OCache
from h2o_cache.attention import h2o_attention
from h2o_cache.cache import claim_pending


class FakeAttention(torch.nn.Module):
    layer_idx = 0

    def __init__(self):
        super().__init__()
        self.eval()


def eager_backend(module, q, k, v, mask, dropout=0.0, scaling=1.0, **kw):
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = (q @ kr.transpose(-1, -2)) * scaling
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs @ vr).transpose(1, 2), None


def naive_h2o(q, k, v, prompt, heavy, recent, scaling):
    """Reference H2O: every (sequence, KV head) keeps its own set of positions. Returns outputs and kept sets."""
    bsz, hq, total, _ = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    budget = heavy + recent
    out = torch.zeros(bsz, total, hq, v.shape[-1])
    kept = {}
    for b in range(bsz):
        for h in range(hkv):
            held, scores = [], {}
            steps = [range(0, prompt)] + [range(t, t + 1) for t in range(prompt, total)]
            for step in steps:
                held = held + list(step)
                for p in step:
                    scores[p] = 0.0
                for i in step:
                    visible = [p for p in held if p <= i]
                    for g in range(groups):
                        head = h * groups + g
                        logits = torch.stack([q[b, head, i] @ k[b, h, p] for p in visible]) * scaling
                        probs = logits.softmax(0)
                        out[b, i, head] = sum(pr * v[b, h, p] for pr, p in zip(probs, visible, strict=True))
                        for pr, p in zip(probs, visible, strict=True):
                            scores[p] += pr.item() / groups
                seen = step[-1] + 1
                if len(held) > budget:
                    protected = [p for p in held if p >= seen - max(recent, 1)]
                    others = sorted((p for p in held if p not in protected), key=lambda p: -scores[p])
                    held = protected + others[: budget - len(protected)]
            kept[b, h] = sorted(held)
    return out, kept


def run_layer(q, k, v, prompt, heavy, recent, scaling, **options):
    cache = H2OCache(None, heavy_budget=heavy, recent_budget=recent, **options)
    module = FakeAttention()
    outs = []
    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, q.shape[2])]
    for start, end in spans:
        keys, values = cache.update(k[:, :, start:end], v[:, :, start:end], 0)
        layer = claim_pending(0, keys)
        assert layer is cache.layers[0]
        out, _ = h2o_attention(layer, "eager", eager_backend, module, q[:, :, start:end], keys, values, None, scaling=scaling)
        outs.append(out)
        assert layer.stored <= layer.budget
    return torch.cat(outs, dim=1), cache.layers[0]


def check_against_naive(prompt, steps, heavy, recent, groups, seed=0, **options):
    torch.manual_seed(seed)
    total = prompt + steps
    q = torch.randn(2, 2 * groups, total, 4)
    k, v = torch.randn(2, 2, total, 4), torch.randn(2, 2, total, 4)
    out, layer = run_layer(q, k, v, prompt, heavy, recent, 0.7, **options)
    ref_out, ref_kept = naive_h2o(q, k, v, prompt, heavy, recent, 0.7)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    stored = layer.stored
    positions = layer._materialised_positions()[..., :stored]
    for (b, h), expected in ref_kept.items():
        assert sorted(positions[b, h].tolist()) == expected
    # The recent window is always kept.
    window = set(range(max(0, total - max(recent, 1)), total))
    for b in range(2):
        for h in range(2):
            assert window <= set(positions[b, h].tolist())
    return layer


def test_matches_naive_h2o_through_prefill_and_decode():
    layer = check_against_naive(prompt=12, steps=10, heavy=3, recent=2, groups=2)
    assert layer.slot_mode and layer.keys.shape[-2] == 6  # 5 kept + 1 scratch slot
    assert layer.get_seq_length() == 22
    assert layer.get_mask_sizes(1) == (6, 17)


def test_no_eviction_below_budget():
    layer = check_against_naive(prompt=5, steps=3, heavy=8, recent=8, groups=1)
    assert not layer.slot_mode and layer.stored == 8 and layer.evicted == 0


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.integers(1, 14),
    steps=st.integers(0, 8),
    heavy=st.integers(0, 6),
    recent=st.integers(0, 6),
    groups=st.sampled_from([1, 2]),
)
def test_property_matches_naive_and_respects_budget(prompt, steps, heavy, recent, groups):
    if heavy + recent == 0:
        recent = 1
    check_against_naive(prompt, steps, heavy, recent, groups)


def test_reorder_carries_scores_with_keys():
    torch.manual_seed(0)
    cache = H2OCache(None, heavy_budget=2, recent_budget=2)
    k = torch.randn(3, 2, 8, 4)
    keys, values = cache.update(k, k.clone(), 0)
    layer = claim_pending(0, keys)
    h2o_attention(layer, "eager", eager_backend, FakeAttention(), torch.randn(3, 2, 8, 4), keys, values, None, scaling=1.0)
    before = {n: getattr(layer, n).clone() for n in ("keys", "scores", "positions")}
    beam_idx = torch.tensor([2, 2, 0])
    cache.reorder_cache(beam_idx)
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor[beam_idx])


def test_batch_size_change_and_crop_are_refused():
    cache = H2OCache(None, heavy_budget=2, recent_budget=2)
    k = torch.randn(2, 2, 3, 4)
    keys, values = cache.update(k, k, 0)
    h2o_attention(claim_pending(0, keys), "eager", eager_backend, FakeAttention(), torch.randn(2, 2, 3, 4), keys, values, None)
    with pytest.raises(ValueError, match="batch size 3"):
        cache.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), 0)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


def test_unrouted_attention_is_reported():
    cache = H2OCache(None, heavy_budget=2, recent_budget=2)
    k = torch.randn(1, 1, 3, 4)
    keys, _ = cache.update(k, k, 0)  # no attention claims the layer
    assert claim_pending(0, keys.clone()) is None  # another step's keys cannot claim it
    with pytest.raises(RuntimeError, match="never reached"):
        cache.update(k[:, :, :1], k[:, :, :1], 0)


# ---- through a model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_budget_is_exact(tiny_llama, attn):
    tiny_llama.set_attn_implementation(attn)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = greedy(tiny_llama, new_tokens=12, ids=ids, past_key_values=DynamicCache())
    out = greedy(tiny_llama, new_tokens=12, ids=ids, past_key_values=H2OCache(tiny_llama.config, heavy_budget=40, recent_budget=40))
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eviction_reduces_memory_and_keeps_budget(tiny_llama):
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(2))
    full = DynamicCache()
    greedy(tiny_llama, new_tokens=12, ids=ids, past_key_values=full)
    cache = H2OCache(tiny_llama.config, heavy_ratio=0.1, recent_ratio=0.1)
    greedy(tiny_llama, new_tokens=12, ids=ids, past_key_values=cache)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert cache.budget() == 20 and cache.tokens_kept() == 20
    assert cache.get_seq_length() == 111  # tokens seen: the last generated token is not fed back
    by_kind = cache.kv_bytes_by_kind()
    assert by_kind["keys"] + by_kind["values"] == full_bytes * 21 // 111  # 20 kept + 1 scratch of 111 seen
    # Everything held is counted: float32 scores and int32 positions of the 21 slots per (sequence, head).
    slots = 2 * tiny_llama.config.num_key_value_heads * 21 * tiny_llama.config.num_hidden_layers
    assert by_kind["bookkeeping"] == slots * (4 + 4) and cache.kv_bytes() == sum(by_kind.values())


def test_cache_implementation_string(tiny_llama):
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(3))
    out = greedy(tiny_llama, new_tokens=12, ids=ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.2, "recent_ratio": 0.2})
    assert isinstance(out.past_key_values, H2OCache)
    assert out.past_key_values.tokens_kept() == 20
    with pytest.raises(ValueError, match="do not also pass (past_key_values|cache)"):
        greedy(tiny_llama, new_tokens=12, ids=ids, cache_implementation="h2o", past_key_values=H2OCache(tiny_llama.config))
    with pytest.raises(ValueError, match="unknown option"):
        greedy(tiny_llama, new_tokens=12, ids=ids, cache_implementation="h2o", cache_config={"budget": 3})


def test_saved_generation_config_loads(tmp_path):
    GenerationConfig(cache_implementation="h2o", cache_config={"heavy_ratio": 0.1}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["cache_implementation"] == "h2o"
    assert GenerationConfig.from_pretrained(tmp_path).cache_implementation == "h2o"


def test_disable_reverts_and_enable_restores(tiny_llama):
    ids = torch.randint(3, 128, (1, 10))
    h2o_cache.disable()
    try:
        assert not h2o_cache.patches_enabled()
        with pytest.raises(ValueError, match="Invalid `cache_implementation`"):
            greedy(tiny_llama, new_tokens=12, ids=ids, cache_implementation="h2o")
        with pytest.raises(RuntimeError, match="disable"):
            greedy(tiny_llama, new_tokens=12, ids=ids, past_key_values=H2OCache(tiny_llama.config))
        greedy(tiny_llama, new_tokens=12, ids=ids)  # plain transformers still works
    finally:
        h2o_cache.enable()
    h2o_cache.enable()  # idempotent
    greedy(tiny_llama, new_tokens=12, ids=ids, cache_implementation="h2o")


def test_unsupported_attention_backend_is_named(tiny_llama):
    tiny_llama.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        greedy(tiny_llama, new_tokens=12, ids=torch.randint(3, 128, (1, 10)), cache_implementation="h2o")
