"""Reproducers of issue #10 for the conversion cache and ``load_model``'s checks (a tiny model stands in for the
embedded GGUF, so nothing here takes the 15 s of a real conversion or touches ~/.cache/h2o_cache)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from h2o_cache import models as hm


def tiny_model_and_tokenizer():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    return model, fast


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """``H2O_CACHE_HOME`` in tmp and a conversion that builds a tiny model; ``calls`` counts conversions."""
    home = tmp_path / "cache"
    monkeypatch.setenv("H2O_CACHE_HOME", str(home))
    calls = []

    def convert(_gguf):
        calls.append(threading.get_ident())
        time.sleep(0.2)  # long enough for a concurrent load to arrive mid-conversion
        return tiny_model_and_tokenizer()

    monkeypatch.setattr(hm, "_from_gguf", convert)
    monkeypatch.setattr(hm, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    return home / hm.EMBEDDED_NAME, calls


def test_converts_once_atomically_with_a_manifest(fake_embedded):
    folder, calls = fake_embedded
    model, tok = hm.load_model()
    assert isinstance(model, LlamaForCausalLM) and tok.pad_token is not None
    assert (folder / hm.MANIFEST).is_file() and hm.saved_model_problem(folder) is None
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []
    hm.load_model()
    assert len(calls) == 1


@pytest.mark.parametrize("damage", ["config_only", "truncated_weights", "no_tokenizer", "manifest_size"])
def test_an_incomplete_cache_is_converted_again(fake_embedded, damage):
    folder, calls = fake_embedded
    hm.load_model()
    weights = folder / "model.safetensors"
    if damage == "config_only":  # what an interrupted first conversion used to leave
        for p in folder.iterdir():
            if p.name != "config.json":
                p.unlink()
    elif damage == "truncated_weights":
        os.truncate(weights, weights.stat().st_size // 2)
        (folder / hm.MANIFEST).unlink()  # the weights check alone must catch it
    elif damage == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
        (folder / hm.MANIFEST).unlink()
    else:
        with open(folder / "config.json", "a") as f:
            f.write(" ")
    assert hm.saved_model_problem(folder) is not None
    hm.load_model()
    assert len(calls) == 2
    assert hm.saved_model_problem(folder) is None


def test_a_conversion_killed_half_way_leaves_nothing_in_place(fake_embedded, monkeypatch):
    folder, calls = fake_embedded
    real = hm._save_converted

    def killed(model, tok, dest):
        model.config.save_pretrained(dest)  # config.json appears, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(hm, "_save_converted", killed)
    with pytest.raises(KeyboardInterrupt):
        hm.load_model()
    assert not folder.exists()
    monkeypatch.setattr(hm, "_save_converted", real)
    hm.load_model()
    assert hm.saved_model_problem(folder) is None
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []


def test_a_stale_temporary_folder_from_a_killed_process_is_cleaned(fake_embedded):
    folder, _ = fake_embedded
    stale = folder.parent / f".{hm.EMBEDDED_NAME}.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    hm.load_model()
    assert not stale.exists()


def test_concurrent_first_loads_convert_once(fake_embedded):
    folder, calls = fake_embedded
    errors, done = [], []

    def load():
        try:
            done.append(hm.load_model()[0])
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(done) == 3
    assert len(calls) == 1


def test_a_cache_that_cannot_be_removed_names_the_folder(fake_embedded, monkeypatch):
    folder, _ = fake_embedded
    hm.load_model()
    (folder / "tokenizer.json").unlink()

    def refuse(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(hm.shutil, "rmtree", refuse)
    with pytest.raises(ValueError, match=f"conversion cache '{folder}' is incomplete .*delete that folder"):
        hm.load_model()


def test_user_folders_and_files_get_one_clear_error(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    hm.load_model(saved)  # complete: loads
    weights = saved / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(ValueError, match=r"not a complete saved model: model.safetensors is truncated"):
        hm.load_model(saved)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"is a file but not a .gguf"):
        hm.load_model(text)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 40)
    with pytest.raises(ValueError, match=r"truncated or damaged GGUF file"):
        hm.load_model(bad)
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match=r"is not a GGUF file"):
        hm.load_model(bad)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hm.load_model(tmp_path / "nope")


def test_a_read_only_cache_with_a_complete_copy_is_used_as_is(fake_embedded, monkeypatch):
    folder, calls = fake_embedded
    hm.load_model()

    def no_lock(home, name):
        raise PermissionError(13, "Permission denied", str(home))

    monkeypatch.setattr(hm, "_cache_lock", no_lock)
    hm.load_model()
    assert len(calls) == 1


def test_a_folder_with_a_damaged_config_is_named(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{cut")
    with pytest.raises(ValueError, match="its config.json is not valid JSON"):
        hm.load_model(tmp_path)
