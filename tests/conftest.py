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


def byte_tokenizer():
    """A byte-level tokenizer built offline (ids 32..126 are the printable ASCII characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2, "\n": 10})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.padding_side = "left"
    return tokenizer


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
