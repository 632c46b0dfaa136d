"""Shared fixtures; the helpers they use (tiny configs for every family, greedy and teacher-forced decoding)
live in tests/fixtures.py."""

from __future__ import annotations

import pytest
import torch
from fixtures import byte_tokenizer, tiny_llama_config
from transformers import LlamaForCausalLM

import h2o_cache  # noqa: F401  (applies the patches)


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama (GQA) and a byte-level tokenizer, both built offline."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(max_position_embeddings=2048)).eval(), byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm_folder(tiny_lm, tmp_path_factory):
    """``tiny_lm`` saved as a model folder (model and tokenizer), as users pass ``--model`` / ``pretrained``."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm[0].save_pretrained(folder)
    tiny_lm[1].save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (integration tests only)."""
    from h2o_cache.models import load_model

    try:
        return load_model()
    except FileNotFoundError as err:
        pytest.skip(str(err))
