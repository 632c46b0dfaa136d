"""The examples run, the CLI explains itself, and the real model behaves (integration)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from h2o_cache import H2OCache
from h2o_cache.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_subcommand_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"generate", "demo", "eval", "bench", "profile", "place"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"
        assert text


def test_bad_budget_is_a_clear_error(capsys):
    assert main(["generate", "--heavy-ratio", "1.5", "--no-compare"]) == 2
    assert "heavy_ratio must be a number in (0, 1]" in capsys.readouterr().err


@pytest.mark.integration
def test_examples_run():
    out = run("examples/generate_h2o.py", "--prompt-tokens", "200", "--max-new-tokens", "4")
    assert "kept 40 of 203 tokens" in out
    out = run("examples/bring_your_own_cache.py", "--prompt-tokens", "100", "--heavy-budget", "16",
              "--recent-budget", "16", "--max-new-tokens", "4")
    assert out.count("cache holds 32 of") == 2


@pytest.mark.integration
def test_cli_generate_reports_both_caches():
    out = run("-m", "h2o_cache.cli", "generate", "--prompt-tokens", "200", "--max-new-tokens", "4")
    assert "full (DynamicCache)" in out and "H2O (h2o)" in out and "KV bytes" in out


@pytest.mark.integration
def test_reference_prompt_puts_the_topic_first_and_the_question_last(smollm):
    from h2o_cache.models import reference_prompt

    _, tokenizer = smollm
    for length in (100, 2048, 4096):
        ids = reference_prompt(tokenizer, length)
        assert length - 400 <= ids.shape[1] <= length  # whole sections only, within the length
        text = tokenizer.decode(ids[0])
        assert text.rstrip().endswith("assistant")  # the chat template's generation prompt
        assert "what the `try` statement does" in text[-200:]
    assert "The \"try\" statement" in tokenizer.decode(reference_prompt(tokenizer, 4096)[0])[:400]
    with pytest.raises(ValueError, match="topic='nope'"):
        reference_prompt(tokenizer, 100, topic="nope")


@pytest.mark.integration
def test_smollm_full_budget_exact_and_20_percent_evicts(smollm):
    model, tokenizer = smollm
    from h2o_cache.models import reference_text

    ids = tokenizer(reference_text()[:4000], return_tensors="pt").input_ids[:, :300]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
        full = model.generate(ids, past_key_values=H2OCache(model.config, heavy_budget=400, recent_budget=400), **kwargs)
        small = model.generate(ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1},
                               **kwargs)
    assert torch.equal(ref.sequences, full.sequences)
    for a, b in zip(ref.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    cache = small.past_key_values
    assert cache.tokens_kept() == 60 and cache.get_seq_length() == 307
    assert len(cache.layers) == 30 and all(layer.stored == 60 for layer in cache.layers)
