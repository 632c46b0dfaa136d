"""No transformers generation path may drop an H2O request without a word.

Continuous batching (``generate_batch``, ``init_continuous_batching``, ``generate(cache_implementation="paged")``)
always builds its own paged full cache; with ``h2o_cache`` imported, each of them refuses an H2O request.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.generation.continuous_batching import ContinuousMixin

import h2o_cache
from h2o_cache import H2OCache
from h2o_cache.compat import cache_kwargs

H2O_CONFIG = dict(cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def _gen_config(**extra):
    return GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=0, **extra)


def test_generate_batch_refuses_h2o_generation_config(model):
    with pytest.raises(ValueError, match='generate_batch: .*cache_implementation="h2o"'):
        model.generate_batch([[5, 6, 7]], generation_config=_gen_config(**H2O_CONFIG))
    with pytest.raises(ValueError, match="continuous batching"):  # positional generation_config
        model.generate_batch([[5, 6, 7]], _gen_config(**H2O_CONFIG))


def test_generate_batch_refuses_h2o_as_model_default(model):
    model.generation_config = _gen_config(**H2O_CONFIG)
    with pytest.raises(ValueError, match="would ignore"):
        model.generate_batch([[5, 6, 7]])


def test_generate_batch_refuses_h2o_cache_object(model):
    for name in ("past_key_values", "cache"):
        with pytest.raises(ValueError, match=f"{name}=H2OCache"):
            model.generate_batch([[5, 6, 7]], generation_config=_gen_config(),
                                 **{name: H2OCache(model.config, heavy_ratio=0.1, recent_ratio=0.1)})


def test_init_continuous_batching_refuses_h2o(model):
    with pytest.raises(ValueError, match="init_continuous_batching"):
        model.init_continuous_batching(generation_config=_gen_config(**H2O_CONFIG))
    with pytest.raises(ValueError, match="init_continuous_batching"):
        with model.continuous_batching_context_manager(generation_config=_gen_config(**H2O_CONFIG)):
            pass


def test_generate_paged_refuses_h2o_cache(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="H2OCache"):
        model.generate(ids, cache_implementation="paged", max_new_tokens=2, do_sample=False,
                       **cache_kwargs(H2OCache(model.config, heavy_ratio=0.1, recent_ratio=0.1)))


def test_without_h2o_continuous_batching_is_untouched(model):
    out = model.generate_batch([[5, 6, 7, 8]], generation_config=_gen_config(), warmup=False)
    assert len(next(iter(out.values())).generated_tokens) == 4
    assert ContinuousMixin.generate_batch._h2o_wrapped
    h2o_cache.disable()
    try:
        assert not hasattr(ContinuousMixin.generate_batch, "_h2o_wrapped")
        assert not hasattr(ContinuousMixin.init_continuous_batching, "_h2o_wrapped")
    finally:
        h2o_cache.enable()
    assert ContinuousMixin.init_continuous_batching._h2o_wrapped
