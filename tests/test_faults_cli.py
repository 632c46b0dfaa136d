"""Reproducers of issue #10 for the CLI: user mistakes end in one line on stderr and exit 2, checked before the
work starts; outputs never replace an input or an existing file without --force, and are written whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from h2o_cache import offload
from h2o_cache.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, code: int, *needles: str) -> str:
    text = capsys.readouterr().err.strip()
    assert code == 2, text
    assert "Traceback" not in text, text
    err = text.splitlines()[-1]  # loading a model may draw transformers' progress bars above it
    assert err.startswith("error: ") and sum(ln.startswith("error:") for ln in text.splitlines()) == 1, text
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=8)).eval()
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    model.save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def profile_file(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "p.pt"
    offload.profile(model, list(ids), progress=False).save(path)
    return path


GENERATE = ["generate", "--no-compare", "--max-new-tokens", "2"]


@pytest.mark.parametrize("argv, needles", [
    (["--prompt", ""], ["--prompt is empty"]),
    (["--prompt", "   "], ["--prompt is empty"]),
    (["--threads", "-1"], ["--threads must be >= 1"]),
    (["--threads", "0"], ["--threads must be >= 1"]),
    (["--device", "cuda:99"], ["--device 'cuda:99'"]),
    (["--device", "banana"], ["--device 'banana' is not a torch device"]),
    (["--prompt-tokens", "0"], ["--prompt-tokens must be >= 1"]),
    (["--prompt-file", "/no/such/prompt.txt"], ["--prompt-file '/no/such/prompt.txt': no such file"]),
    (["--model", "/nope"], ["model='/nope': no such folder"]),
    (["--attn-implementation", "flash_attention_2"], ["flash_attention_2 needs a CUDA --device"]),
])
def test_generate_mistakes_are_one_line(capsys, argv, needles):
    one_line_error(capsys, main([*GENERATE, *argv]), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    one_line_error(capsys, main([*GENERATE, "--device", "cuda"]), "CUDA is not available")


def test_model_files_that_are_not_models(capsys, tmp_path):
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 40)
    one_line_error(capsys, main([*GENERATE, "--model", str(gguf)]), "truncated or damaged GGUF file")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    one_line_error(capsys, main([*GENERATE, "--model", str(text)]), "is a file but not a .gguf")


def test_prompt_longer_than_the_context_is_refused(capsys, saved_model, tmp_path):
    # tiny_llama_config has a 512-token context.
    one_line_error(capsys, main([*GENERATE, "--model", str(saved_model), "--prompt-tokens", "200000"]),
                   "--prompt-tokens (200000 prompt tokens)", "exceeds the model's context of 512 tokens")
    one_line_error(capsys, main([*GENERATE, "--model", str(saved_model), "--prompt", "hello world",
                                 "--max-new-tokens", "600"]), "--max-new-tokens (600)", "512")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    one_line_error(capsys, main([*GENERATE, "--prompt-file", str(empty)]), "is empty")


def test_place_mistakes_are_one_line_and_write_nothing(capsys, tmp_path, profile_file):
    out = tmp_path / "plan.json"
    place = ["place", "--profile", str(profile_file), "--out", str(out)]
    one_line_error(capsys, main(["place", "--profile", str(tmp_path / "missing.pt"), "--budget", "30%",
                                 "--out", str(out)]), "missing.pt", "no such file")
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not torch")
    one_line_error(capsys, main(["place", "--profile", str(foreign), "--budget", "30%", "--out", str(out)]),
                   "is not an h2o-cache neuron profile")
    one_line_error(capsys, main([*place, "--budget", "1e400"]), "--budget '1e400'")
    one_line_error(capsys, main([*place, "--budget", "."]), "--budget '.'")
    one_line_error(capsys, main([*place, "--budget", "30%", "--curve", "0.1,abc"]), "--curve")
    one_line_error(capsys, main([*place, "--budget", "30%", "--curve", "0.1,1.5"]), "--curve", "[0, 1]")
    one_line_error(capsys, main([*place, "--budget", "30%", "--plot", "/no/such/dir/c.png"]),
                   "--plot '/no/such/dir/c.png'", "does not exist")
    one_line_error(capsys, main([*place, "--budget", "30%", "--curve", "", "--plot", str(tmp_path / "c.png")]),
                   "--plot draws the --curve")
    assert not out.exists()  # none of the failures left a plan behind


def test_outputs_never_replace_inputs_or_existing_files(capsys, tmp_path, profile_file):
    before = profile_file.read_bytes()
    one_line_error(capsys, main(["place", "--profile", str(profile_file), "--budget", "30%",
                                 "--out", str(profile_file), "--force"]), "is also an input")
    assert profile_file.read_bytes() == before
    out = tmp_path / "plan.json"
    out.write_text("mine")
    argv = ["place", "--profile", str(profile_file), "--budget", "30%", "--out", str(out), "--curve", "0.5"]
    one_line_error(capsys, main(argv), "already exists; pass --force")
    assert out.read_text() == "mine"
    assert main([*argv, "--force"]) == 0
    assert offload.PlacementPlan.load(out).budget_bytes > 0
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_profile_checks_its_output_before_the_work(capsys, tmp_path):
    # --model /nope would fail at load: the --out error first shows the output is checked before any work.
    one_line_error(capsys, main(["profile", "--model", "/nope", "--out", "/no/such/dir/p.pt"]),
                   "--out '/no/such/dir/p.pt'", "does not exist")
    existing = tmp_path / "p.pt"
    existing.write_text("mine")
    one_line_error(capsys, main(["profile", "--model", "/nope", "--out", str(existing)]), "already exists")
    one_line_error(capsys, main(["profile", "--out", str(tmp_path / "q.pt"), "--seq-len", "0"]),
                   "--seq-len must be >= 1")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "a"}\n{oops}\n')
    one_line_error(capsys, main(["profile", "--model", "/nope", "--text", str(bad), "--out", str(tmp_path / "q.pt")]),
                   "t.jsonl:2: not a JSON record")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from h2o_cache.files import atomic_write

    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_the_installed_cli_prints_no_traceback():
    done = subprocess.run([sys.executable, "-m", "h2o_cache.cli", "generate", "--prompt", ""], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --prompt is empty; give some text (or leave it out for the built-in prompt)"
