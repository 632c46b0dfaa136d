from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import h2o_cache  # noqa: F401  (applies the patches)


def tiny_llama_config(**overrides) -> LlamaConfig:
    options = dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    options.update(overrides)
    return LlamaConfig(**options)


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (integration tests only)."""
    from h2o_cache.models import load_model

    try:
        return load_model()
    except FileNotFoundError as err:
        pytest.skip(str(err))
