"""H2O under real ``generate`` workloads: padded batches, sampling, beams, continuation, long runs, dtypes.

Where eviction makes a reference hard to get from another cache, the reference is the same sequence fed to a
fresh ``H2OCache`` one token at a time ("teacher forcing"): a row's kept set depends only on that row's history,
so any batch/beam bookkeeping error (a reorder that forgets the scores, a pad that takes a real token's slot)
shows up as a logit difference.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import left_padded, make_model, max_logit_diff, prompt_ids, teacher_forced_logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from h2o_cache import H2OCache

H, R = 4, 4  # an absolute budget of 8, 20% of the 40-token prompts


def run_padded_vs_alone(model, lengths, heavy, recent, new_tokens=20):
    generator = torch.Generator().manual_seed(sum(lengths) + heavy)
    seqs = [torch.randint(3, 100, (n,), generator=generator) for n in lengths]
    ids, mask = left_padded(seqs)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, output_logits=True,
              return_dict_in_generate=True)
    cache = H2OCache(model.config, heavy_budget=heavy, recent_budget=recent)
    batch = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], past_key_values=H2OCache(model.config, heavy_budget=heavy,
                                                                  recent_budget=recent), **kw)
        assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(s):]), f"row {i}"
        diff = max((b[i] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits, strict=True))
        assert diff < 1e-4, f"row {i}: {diff}"
    for layer in cache.layers:
        seen_real = torch.tensor(lengths) + new_tokens - 1
        valid = layer.valid if layer.valid is not None else torch.ones(layer.keys.shape[:3], dtype=torch.bool)
        kept = valid[:, :, : layer.stored]
        # Pads never displace a real token: a row keeps min(real tokens seen, budget) real tokens ...
        assert torch.equal(kept.sum(-1), seen_real.clamp_max(layer.budget)[:, None].expand_as(kept[..., 0]))
        # ... and never gather attention mass (they cannot become heavy hitters).
        assert (layer.scores[~valid] == 0).all()
    return cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("heavy, recent", [(64, 64), (H, R), (5, 2)], ids=["full", "20pct", "short-rows"])
def test_left_padded_batch_equals_each_row_alone(attn, heavy, recent):
    # Row lengths straddle the budget: 40 > 8, 9 ~ 8, 3 < budget (its pads must leave before any real token).
    run_padded_vs_alone(make_model("llama", attn), [40, 9, 3], heavy, recent)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    lengths=st.lists(st.integers(1, 24), min_size=2, max_size=3),
    heavy=st.integers(0, 6),
    recent=st.integers(1, 6),
)
def test_padding_property(lengths, heavy, recent):
    run_padded_vs_alone(_QWEN2, lengths, heavy, recent, new_tokens=10)


_QWEN2 = make_model("qwen2")


def test_ratio_budget_comes_from_the_padded_prompt_length():
    model = make_model("llama")
    ids, mask = left_padded([prompt_ids(1, 40)[0], prompt_ids(1, 10)[0]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                         cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})
    assert out.past_key_values.budget() == 8  # 20% of the padded width, for every row


def test_ratio_budget_resolves_against_the_whole_prompt_under_chunked_prefill():
    model = make_model("llama")
    ids = prompt_ids(1, 40)
    kw = dict(max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True, prefill_chunk_size=8)
    out = model.generate(ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1}, **kw)
    assert out.past_key_values.budget() == 8  # 20% of the 40-token prompt, not of its first 8-token chunk
    # A user's own cache cannot know the prompt's length: ratios need prompt_length (or absolute budgets).
    with pytest.raises(ValueError, match="prefill_chunk_size.*prompt_length"):
        model.generate(ids, past_key_values=H2OCache(model.config, heavy_ratio=0.1, recent_ratio=0.1), **kw)
    cache = H2OCache(model.config, heavy_ratio=0.1, recent_ratio=0.1, prompt_length=40)
    model.generate(ids, past_key_values=cache, **kw)
    assert cache.budget() == 8
    with pytest.raises(ValueError, match="prompt_length must be an integer >= 1"):
        H2OCache(model.config, prompt_length=0)


@pytest.mark.parametrize("budget", ["full", "20pct"])
def test_sampling_with_num_return_sequences(budget):
    model = make_model("llama")
    ids = prompt_ids()
    heavy, recent = (64, 64) if budget == "full" else (H, R)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, top_k=0, num_return_sequences=3,
              eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(3)
    out = model.generate(ids, past_key_values=H2OCache(model.config, heavy_budget=heavy, recent_budget=recent), **kw)
    assert out.sequences.shape == (6, 40 + 16)
    if budget == "full":
        torch.manual_seed(3)
        ref = model.generate(ids, **kw)
        assert torch.equal(out.sequences, ref.sequences) and max_logit_diff(out, ref) < 1e-5
    logits = torch.stack(out.logits, dim=1)  # [6, new, vocab]
    for row in range(6):  # batch_repeat_interleave gave every copy its prompt's full state
        cache = H2OCache(model.config, heavy_budget=heavy, recent_budget=recent)
        forced = teacher_forced_logits(model, ids[row // 3][None], out.sequences[row, 40:-1][None], cache)[0]
        assert (forced - logits[row]).abs().max() < 1e-4


def test_beam_search_exact_at_full_budget():
    model = make_model("llama")
    ids = prompt_ids()
    kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, eos_token_id=None)
    out = model.generate(ids, past_key_values=H2OCache(model.config, heavy_budget=64, recent_budget=64), **kw)
    assert torch.equal(out, model.generate(ids, **kw))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_beam_search_reorders_scores_with_keys(attn):
    """Each returned beam's score equals its tokens' log-probabilities under a fresh H2O cache fed that beam.

    A reorder that moved keys but not scores (or positions) would evict differently from the teacher-forced run.
    """
    model = make_model("llama", attn)
    ids = prompt_ids()
    out = model.generate(
        ids, max_new_tokens=16, num_beams=3, num_return_sequences=3, length_penalty=0.0, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True,
        past_key_values=H2OCache(model.config, heavy_budget=H, recent_budget=R),
    )
    assert out.past_key_values.tokens_kept() == H + R
    for row in range(6):
        new = out.sequences[row, 40:]
        cache = H2OCache(model.config, heavy_budget=H, recent_budget=R)
        logprobs = torch.log_softmax(teacher_forced_logits(model, ids[row // 3][None], new[None, :-1], cache)[0], dim=-1)
        total = logprobs.gather(1, new[:, None]).sum()
        assert abs(total.item() - out.sequences_scores[row].item()) < 1e-4


def test_reorder_and_select_move_every_per_token_tensor():
    model = make_model("llama")
    cache = H2OCache(model.config, heavy_budget=H, recent_budget=R)
    with torch.no_grad():
        model(prompt_ids(3, 20), past_key_values=cache)
        for _ in range(5):
            model(prompt_ids(3, 1, seed=_), past_key_values=cache)
    layer = cache.layers[1]
    names = ("keys", "values", "scores", "positions")
    before = {n: getattr(layer, n).clone() for n in names}
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for n in names:
        assert torch.equal(getattr(layer, n), before[n][[2, 0, 0]]), n
    cache.batch_select_indices(torch.tensor([0]))
    for n in names:
        assert torch.equal(getattr(layer, n), before[n][[2]]), n


def test_prompt_lookup_is_refused_before_generating():
    # (Contrastive search is refused too, but transformers 5 first asks for its hub repo, unreachable here.)
    model = make_model("llama")
    for cache_args in ({"cache_implementation": "h2o"}, {"past_key_values": H2OCache(model.config)}):
        with pytest.raises(ValueError, match="assisted/speculative"):
            model.generate(prompt_ids(1, 12), max_new_tokens=4, prompt_lookup_num_tokens=3, **cache_args)


def test_assistant_model_is_refused():
    model = make_model("llama")
    with pytest.raises(ValueError, match="assisted/speculative"):
        model.generate(prompt_ids(1, 12), max_new_tokens=4, assistant_model=make_model("llama"),
                       cache_implementation="h2o")


def test_crop_is_refused_and_declared():
    cache = H2OCache(make_model("llama").config)
    assert not any(layer.is_croppable for layer in cache.layers)  # Cache.is_croppable exists from 5.3 on
    cache.crop(0)  # a no-op crop is harmless
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


def test_static_cache_and_h2o_do_not_mix():
    model = make_model("llama")
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(prompt_ids(1, 12), max_new_tokens=2, cache_implementation="static",
                       past_key_values=H2OCache(model.config))


@pytest.mark.parametrize("budget", ["full", "20pct"])
def test_continuing_a_conversation_on_the_same_cache(budget):
    model = make_model("llama")
    heavy, recent = (128, 128) if budget == "full" else (H, R)
    cache, dyn = H2OCache(model.config, heavy_budget=heavy, recent_budget=recent), DynamicCache(config=model.config)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    ids = prompt_ids()
    first, ref_first = model.generate(ids, past_key_values=cache, **kw), model.generate(ids, past_key_values=dyn, **kw)
    turn = prompt_ids(2, 6, seed=9)
    second = model.generate(torch.cat([first, turn], 1), past_key_values=cache, **kw)
    ref_second = model.generate(torch.cat([ref_first, turn], 1), past_key_values=dyn, **kw)
    assert cache.get_seq_length() == dyn.get_seq_length() == 40 + 12 + 6 + 12 - 1
    if budget == "full":
        assert torch.equal(second, ref_second)
    else:
        assert cache.tokens_kept() == H + R


def test_long_generation_keeps_a_constant_stored_size():
    model = make_model("qwen3")
    cache = H2OCache(model.config, heavy_budget=H, recent_budget=R)
    sizes = set()
    with torch.no_grad():
        out = model(prompt_ids(2, 40), past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(4 * (H + R) * 2):  # 8x the budget
            out = model(token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            sizes.add((cache.kv_bytes(), tuple(layer.keys.shape for layer in cache.layers)))
    assert len(sizes) == 1
    assert cache.tokens_kept() == H + R and cache.get_seq_length() == 40 + 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = make_model("llama", dtype=dtype)
    ids = prompt_ids()
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    full = model.generate(ids, past_key_values=H2OCache(model.config, heavy_budget=64, recent_budget=64), **kw)
    assert torch.equal(full, model.generate(ids, **kw))
    cache = H2OCache(model.config, heavy_budget=H, recent_budget=R)
    out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True, past_key_values=cache)
    for layer in cache.layers:
        assert layer.keys.dtype == dtype and layer.scores.dtype == torch.float32
        assert torch.isfinite(layer.scores).all()
        # Every query hands out one unit of attention per KV head: the scores stay bounded by tokens seen.
        assert layer.scores.max() <= cache.get_seq_length()
    assert all(torch.isfinite(step).all() for step in out.logits)


def test_half_precision_eager_prefill_scores_come_from_float32():
    """Eager returns its weights rounded to fp16; H2O must score from float32 probabilities, as on sdpa.

    Layer 0 sees identical inputs under both backends, so its scores must agree exactly.
    """
    ids, mask = left_padded([prompt_ids(1, 30)[0], prompt_ids(1, 12, seed=1)[0]])
    scores = {}
    for attn in ("eager", "sdpa"):
        model = make_model("llama", dtype=torch.float16, attn=attn)
        cache = H2OCache(model.config, heavy_budget=64, recent_budget=64)
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
        scores[attn] = cache.layers[0].scores
        assert all(layer.scores.dtype == torch.float32 for layer in cache.layers)
    torch.testing.assert_close(scores["eager"], scores["sdpa"], atol=1e-6, rtol=1e-6)
    assert not scores["eager"][1, :, :18].any()  # padding receives no attention
