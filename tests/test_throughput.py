"""Smoke tests of the throughput benchmark on a tiny random Llama (no timed assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from h2o_cache.eval import batch_search, bench, throughput


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


def _args(tmp_path, **extra):
    return bench.ThroughputSpec(prompt_lens=[32], batches=[2], gen=4, repeats=1, target_prompt=32,
                                     target_batch=2, max_batch=4, text_prompts=False, no_progress=True,
                                     bandwidth_mib=8, out=str(tmp_path), **extra)


def test_grid_outputs_and_skips(tiny, tmp_path):
    model, folder = tiny
    args = _args(tmp_path, caches=["full", "h2o", "offloaded"], budgets=[0.25], systems=["flexgen", "flash2"],
                 same_memory_gib=-1)
    res = bench.run_benchmark(args, model=model, model_path=folder)
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["roofline"]["bandwidth_gb_s"] > 0
    ok = [r for r in data["grid"] if r["status"] == "ok"]
    assert {r["cache"] for r in ok} == {"full", "h2o"}
    for r in ok:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["e2e_tok_s"] > 0
        assert r["kv_bytes"] > 0 and "roofline_frac" in r
    h2o = next(r for r in ok if r["cache"] == "h2o" and r["budget_pct"] < 100)
    dyn = next(r for r in ok if r["cache"] == "full")
    assert h2o["budget_tokens"] == 8 and h2o["kv_bytes"] < dyn["kv_bytes"]
    offl = next(r for r in data["grid"] if r["cache"] == "offloaded")
    assert offl["status"] == "skipped" and "CPU" in offl["reason"]
    if not torch.cuda.is_available():
        for r in data["baselines"]:
            assert r["status"] == "skipped" and "needs CUDA" in r["reason"]
    md = (tmp_path / "throughput.md").read_text()
    assert "| system |" in md and "## Targets" in md and "Skipped" in md and "needs CUDA" in md
    assert len(res["targets"]) == 7


def test_same_memory_search_and_accelerate(tiny, tmp_path):
    model, folder = tiny
    # everything fits: the search must stop at max_batch
    args = _args(tmp_path, caches=["full"], systems=["accelerate"], targets=False, same_memory_gib=1000.0)
    res = bench.run_benchmark(args, model=model, model_path=folder)
    sm = res["same_memory"]
    assert sm["full_max_batch"] == 4 and sm["h2o_max_batch"] == 4 and sm["h2o_hit_search_cap"]
    assert all(p["fits"] for probes in sm["probes"].values() for p in probes)
    assert sm["runs"]["h2o"]["status"] == "ok"
    acc = res["baselines"][0]
    assert acc["status"] == "ok", acc
    assert acc["offload"]["offloaded_layers"] == 1


def test_largest_batch():
    calls = []

    def linear(b):  # 1 GiB + 0.5 GiB per sequence
        calls.append(b)
        return 1.0 + 0.5 * b

    assert batch_search.largest_batch(linear, 6.6, 4, 64) == 11
    assert sorted(calls) == [4, 8, 11, 12]  # two probes to fit the line, then the answer and one past it
    assert batch_search.largest_batch(lambda b: 1.0 + 0.5 * b, 2.1, 4, 64) == 2
    assert batch_search.largest_batch(lambda b: 100.0, 1.0, 4, 64) == 0
    assert batch_search.largest_batch(lambda b: 1.0, 2.0, 4, 64) == 64
    # not linear: refitting after each probe still lands on the true boundary
    assert batch_search.largest_batch(lambda b: 1.0 + 0.1 * b * b, 9.0, 2, 64) == 8
    # a noisy first probe skews the first fit; refitting against the farthest probe recovers in a few probes
    calls.clear()

    def noisy(b):
        calls.append(b)
        return 2.3 + 0.038 * b + (0.05 if b == 4 else 0.0)

    assert batch_search.largest_batch(noisy, 3.4, 4, 64) == 28 and len(calls) <= 5


def test_same_memory_reuses_the_probe_that_set_the_budget(tiny):
    model, _ = tiny
    calls = []

    def probe(*, cache, batch, budget):  # every fresh probe reads 5% above the one that set the budget
        calls.append((cache, batch))
        per_seq = 0.1 if cache == "full" else 0.02
        return {"batch": batch, "peak_gib": (1.0 + per_seq * batch) * 1.05}

    known = {("full", 2): {"batch": 2, "peak_gib": 1.2}}
    sm = batch_search.same_memory(model, budget_gib=1.2 * 1.02, prompt_len=16, gen=2, h2o_budget=0.25, start_batch=2,
                                max_batch=4, probe=probe, tokenizer=None, measure_kwargs={"warmup": 0, "repeats": 1},
                                known=known)
    assert sm["full_max_batch"] == 2 and ("full", 2) not in calls
    assert sm["probes"]["full"][0]["fits"] and sm["runs"]["full"]["batch"] == 2
    assert ("h2o", 2) in calls and sm["h2o_max_batch"] == 4


def test_isolated_probe_and_micro_batched_runs(tiny, tmp_path):
    model, folder = tiny
    spec = dict(cache="h2o", batch=3, prompt_len=32, gen=4, budget=0.25, probe_steps=1, micro_batch=2)
    p = batch_search.probe_peak_isolated(folder, dtype="float32", threads=1, text_prompts=False, **spec)
    assert p["batch"] == 3 and p["peak_gib"] > 0 and p["projected_growth_gib"] == 0
    rec = throughput.measure(model, cache="h2o", batch=3, prompt_len=32, gen=4, budget=0.25, repeats=1,
                             micro_batch=2)
    assert rec["status"] == "ok" and rec["prefill_micro_batch"] == 2 and rec["tokens_kept"] == 8


def test_cli_help_lists_options():
    import argparse

    from h2o_cache.eval import cli

    p = argparse.ArgumentParser()
    cli.add_bench_arguments(p)
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
