"""Reproducers of issue #10's core faults: each failed before its fix, and each fix has a clear rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import tiny_llama_config
from transformers import DynamicCache, LlamaForCausalLM
from transformers.generation.utils import GenerationMixin

import h2o_cache
from h2o_cache import H2OCache, H2OConfig, prefill_in_micro_batches
from h2o_cache.compat import cache_kwargs
from h2o_cache.scoring import attention_with_mass


def ids_of(batch: int = 1, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new_tokens=6, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, **kwargs)


# ---- inference_mode ---------------------------------------------------------------------------------------------
def test_cache_filled_in_inference_mode_continues_outside(tiny_llama):
    ids = ids_of()
    h2o, full = H2OCache(tiny_llama.config, heavy_budget=4, recent_budget=4), DynamicCache()
    with torch.inference_mode():
        first = greedy(tiny_llama, ids, **cache_kwargs(h2o))
        greedy(tiny_llama, ids, **cache_kwargs(full))
    # The chat loop's next turn, outside inference_mode: DynamicCache works there, so must H2O.
    second = greedy(tiny_llama, first, **cache_kwargs(h2o))
    greedy(tiny_llama, first, **cache_kwargs(full))
    assert second.shape == (1, ids.shape[1] + 12)
    assert h2o.tokens_kept() == 8 and not h2o.layers[0].keys.is_inference()
    # ... and it is the same cache a no_grad run builds.
    reference = H2OCache(tiny_llama.config, heavy_budget=4, recent_budget=4)
    with torch.no_grad():
        greedy(tiny_llama, ids, **cache_kwargs(reference))
        assert torch.equal(greedy(tiny_llama, first, **cache_kwargs(reference)), second)


def test_micro_batched_prefill_in_inference_mode_then_generate(tiny_llama):
    ids = ids_of(batch=4, length=16)
    with torch.inference_mode():
        cache, _ = prefill_in_micro_batches(tiny_llama, ids[:, :-1], lambda: H2OCache(
            tiny_llama.config, heavy_budget=3, recent_budget=3), micro_batch=2)
    out = greedy(tiny_llama, ids, **cache_kwargs(cache))
    assert out.shape == (4, 22) and cache.tokens_kept() == 6


# ---- output_attentions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_is_refused_not_silently_empty(attn):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation=attn)).eval()
    with pytest.raises(ValueError, match="output_attentions=True is not supported with H2OCache"):
        greedy(model, ids_of(), cache_implementation="h2o", cache_config={"heavy_budget": 4, "recent_budget": 4},
               output_attentions=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        greedy(model, ids_of(), **cache_kwargs(H2OCache(model.config, heavy_budget=4, recent_budget=4)),
               output_attentions=True, return_dict_in_generate=True)
    if attn == "eager":  # a plain forward refuses too (sdpa cannot return weights at all)
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(ids_of(), **cache_kwargs(H2OCache(model.config)), output_attentions=True)


# ---- batch_select_indices --------------------------------------------------------------------------------------
@pytest.mark.parametrize("indices", [(0, 2), [0, 2], torch.tensor([0, 2])])
def test_batch_select_indices_selects_rows_like_dynamic_layer(tiny_llama, indices):
    ids = ids_of(batch=3, length=12)
    h2o, full = H2OCache(tiny_llama.config, heavy_budget=4, recent_budget=4), DynamicCache()
    with torch.no_grad():
        tiny_llama(ids, **cache_kwargs(h2o))
        tiny_llama(ids, **cache_kwargs(full))
    before = h2o.layers[0].keys.clone()
    h2o.batch_select_indices(indices)
    full.batch_select_indices(indices)
    layer = h2o.layers[0]
    assert layer.keys.shape[0] == full.layers[0].keys.shape[0] == 2
    assert torch.equal(layer.keys, before[[0, 2]])
    assert layer.scores.shape[0] == layer.positions.shape[0] == 2


# ---- the generate patch recognised through other libraries' wrappers --------------------------------------------
def test_generate_h2o_survives_another_library_wrapping_prepare(tiny_llama):
    import functools

    current = GenerationMixin._prepare_cache_for_generation

    @functools.wraps(current)
    def wrapped(self, *args, **kwargs):
        return current(self, *args, **kwargs)

    def unmarked(self, *args, **kwargs):  # a wrapper without functools.wraps
        return current(self, *args, **kwargs)

    try:
        for wrapper in (wrapped, unmarked):
            GenerationMixin._prepare_cache_for_generation = wrapper
            out = greedy(tiny_llama, ids_of(), cache_implementation="h2o",
                         cache_config={"heavy_budget": 4, "recent_budget": 4})
            assert out.shape == (1, 26)
    finally:
        GenerationMixin._prepare_cache_for_generation = current

    class OwnCache(LlamaForCausalLM):  # a model that builds its own cache is still refused
        def _prepare_cache_for_generation(self, *args, **kwargs):
            return None

    model = OwnCache(tiny_llama.config).eval()
    with pytest.raises(ValueError, match="builds its own cache"):
        greedy(model, ids_of(), cache_implementation="h2o")


# ---- budget floor and warning ----------------------------------------------------------------------------------
def test_short_prompt_ratio_budget_warns_and_min_budget_floors_it(tiny_llama, caplog):
    ids = ids_of(length=42)
    with caplog.at_level(logging.WARNING, logger="h2o_cache.config"):
        # A config of its own: each config is warned about once per process.
        for _ in range(2):
            greedy(tiny_llama, ids, cache_implementation="h2o", cache_config={"seed": 410})
    assert caplog.text.count("keep only 8 tokens") == 1 and "min_budget" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="h2o_cache.config"):
        cache = H2OCache(tiny_llama.config, min_budget=32)
        greedy(tiny_llama, ids, **cache_kwargs(cache))
    assert caplog.text == ""
    assert (cache.layers[0].heavy, cache.layers[0].recent) == (16, 16)
    # A long enough prompt is untouched by the floor: 10% + 10% of 400 tokens is 80 > 32.
    assert H2OConfig(min_budget=32).token_budgets(400) == (40, 40)
    assert H2OConfig(heavy_ratio=0.3, recent_ratio=0.1, min_budget=20).token_budgets(10) == (15, 5)
    with pytest.raises(ValueError, match="min_budget must be an integer >= 0"):
        H2OConfig(min_budget=-1)
    with pytest.raises(ValueError, match="min_budget .* is a floor for heavy_ratio"):
        H2OConfig(heavy_budget=4, recent_budget=4, min_budget=8)


# ---- cache_config and budget types -----------------------------------------------------------------------------
def test_cache_config_without_cache_implementation_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="cache_implementation is not set"):
        greedy(tiny_llama, ids_of(), cache_config={"heavy_budget": 4, "recent_budget": 4})


def test_cache_config_that_is_not_a_dict_is_named(tiny_llama):
    with pytest.raises(ValueError, match="cache_config must be a dict of H2OConfig options"):
        greedy(tiny_llama, ids_of(), cache_implementation="h2o", cache_config="heavy=0.1")
    config = H2OConfig(heavy_budget=3, recent_budget=3)
    assert H2OConfig.from_dict(config) is config


def test_numpy_and_torch_numbers_are_accepted_as_plain_numbers():
    config = H2OConfig(heavy_budget=np.int64(4), recent_budget=torch.tensor(4), sink_tokens=np.int32(2))
    assert config == H2OConfig(heavy_budget=4, recent_budget=4, sink_tokens=2)
    assert type(config.heavy_budget) is int and type(config.recent_budget) is int
    ratios = H2OConfig(heavy_ratio=np.float64(0.25), recent_ratio=torch.tensor(0.5))
    assert (ratios.heavy_ratio, ratios.recent_ratio) == (0.25, 0.5) and type(ratios.recent_ratio) is float
    for bad in (dict(heavy_budget=4.0), dict(heavy_budget=torch.tensor([1, 2])), dict(heavy_budget=np.float64(4)),
                dict(heavy_ratio=torch.tensor([0.1, 0.2]))):
        with pytest.raises(ValueError, match="must be"):
            H2OConfig(**bad)


# ---- misuse messages -------------------------------------------------------------------------------------------
def test_cache_left_mid_step_by_an_exception_names_reset(tiny_llama):
    cache = H2OCache(tiny_llama.config, heavy_budget=4, recent_budget=4)
    cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)  # a forward that died after update
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"call cache\.reset\(\)"):
        tiny_llama(ids_of(), **cache_kwargs(cache))
    cache.reset()
    with torch.no_grad():
        tiny_llama(ids_of(), **cache_kwargs(cache))
    assert cache.get_seq_length() == 20


def test_one_cache_on_two_models_is_refused_clearly(tiny_llama):
    cache = H2OCache(None, heavy_budget=4, recent_budget=4)
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=128, num_key_value_heads=4)).eval()
    with torch.no_grad():
        tiny_llama(ids_of(), **cache_kwargs(cache))
        with pytest.raises(ValueError, match="one H2OCache serves one model"):
            other(ids_of()[:, -1:], **cache_kwargs(cache))


@pytest.mark.parametrize(
    "make",
    [
        lambda: tf.BloomForCausalLM(tf.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=128)),
        lambda: tf.FalconForCausalLM(tf.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                     vocab_size=128)),
    ],
    ids=["bloom", "falcon"],
)
def test_families_bypassing_the_attention_registry_are_refused_before_prefill(make):
    model = make().eval()
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="attention is computed inside the modeling file"):
        greedy(model, ids_of(), cache_implementation="h2o", pad_token_id=0)
    with pytest.raises(ValueError, match="attention is computed inside the modeling file"):
        greedy(model, ids_of(), **cache_kwargs(H2OCache(None)), pad_token_id=0)
    assert calls == []  # refused before the prefill ran


# ---- fp16 range ------------------------------------------------------------------------------------------------
def test_fp16_logits_beyond_65504_stay_finite_like_sdpa():
    generator = torch.Generator().manual_seed(0)
    query = (torch.randn(1, 4, 3, 64, generator=generator) * 200).half()
    key = (torch.randn(1, 2, 7, 64, generator=generator) * 200).half()
    value = torch.randn(1, 2, 7, 64, generator=generator).half()
    assert (query[0, 0].float() @ key[0, 0].float().T / 8).abs().max() > 65504  # the case that overflowed
    out, mass = attention_with_mass(query, key, value, scaling=64**-0.5)
    causal = torch.ones(3, 7, dtype=torch.bool).tril(4)
    ref = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                                         attn_mask=causal)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=2e-3, rtol=0)


def test_disable_documents_how_to_get_h2o_back(tiny_llama):
    h2o_cache.disable()
    try:
        # transformers' own "Invalid cache_implementation" error is all there is while the patches are reverted;
        # the hint lives in disable()'s documentation.
        assert "enable()" in h2o_cache.disable.__doc__
        with pytest.raises(ValueError, match="Invalid `cache_implementation`"):
            greedy(tiny_llama, ids_of(), cache_implementation="h2o")
    finally:
        h2o_cache.enable()


def test_disable_keeps_a_later_librarys_wrapper_and_enable_works_again(tiny_llama):
    import functools

    ours = GenerationMixin._prepare_cache_for_generation

    @functools.wraps(ours)
    def theirs(self, *args, **kwargs):
        theirs.calls += 1
        return ours(self, *args, **kwargs)

    theirs.calls = 0
    GenerationMixin._prepare_cache_for_generation = theirs
    try:
        h2o_cache.disable()
        assert GenerationMixin._prepare_cache_for_generation is theirs  # not clobbered by the revert
        assert isinstance(greedy(tiny_llama, ids_of())[0], torch.Tensor) and theirs.calls == 1
        with pytest.raises(RuntimeError, match=r"call h2o_cache\.enable\(\)"):  # before any forward ran
            tiny_llama(ids_of(), **cache_kwargs(H2OCache(tiny_llama.config)))
        h2o_cache.enable()
        cache = H2OCache(tiny_llama.config, heavy_budget=4, recent_budget=4)
        greedy(tiny_llama, ids_of(), **cache_kwargs(cache))
        assert cache.tokens_kept() == 8 and theirs.calls == 2
    finally:
        h2o_cache.disable()
        GenerationMixin._prepare_cache_for_generation = ours.__wrapped__  # transformers' own
        h2o_cache.enable()
