"""Smoke tests of the quality evaluation (perplexity, retrieval, lm-eval wrapper) on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from h2o_cache.eval import caches, perplexity, quality, retrieval, texts
from h2o_cache.eval.lm_eval_tasks import LOCAL_TASKS, write_tasks
from h2o_cache.eval.quality_report import write_report


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    return tiny_lm


TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 30)


def test_validation_names_the_parameter():
    with pytest.raises(ValueError, match="policies"):
        caches.check_policies(["lru"])
    with pytest.raises(ValueError, match="budgets"):
        caches.check_budgets([0.0])
    with pytest.raises(ValueError, match="budgets"):
        caches.check_budgets([1.5])
    with pytest.raises(ValueError, match="tasks"):
        quality.evaluate(None, None, tasks=["mmlu"], text=TEXT)
    assert caches.budget_tokens(0.2, 100) == 20
    assert caches.budget_tokens(0.05, 10) == 2  # never below 2 slots
    config = caches.h2o_config(1.0, 101)
    assert config.heavy_budget + config.recent_budget == 101  # a budget of 1 keeps every token
    assert caches.configurations(["full", "h2o"], [0.1, 0.5]) == [("full", 1.0), ("h2o", 0.1), ("h2o", 0.5)]


def test_perplexity_smoke_and_full_budget_equals_full(tiny):
    model, tokenizer = tiny
    configs = [("full", 1.0), ("h2o", 1.0), ("h2o", 0.2), ("local", 0.2), ("streaming", 0.2), ("random", 0.2),
               ("h2o_no_recent", 0.2)]
    rows = perplexity.run_perplexity(model, tokenizer, TEXT, configs, prompt_len=64, gen_len=12, windows=2,
                                  progress=False)
    assert [(r["policy"], r["budget"]) for r in rows] == configs
    assert all(math.isfinite(r["perplexity"]) and r["tokens"] == 24 for r in rows)
    # The budget covers the prompt and the first decode steps only partly: at 100% of the prompt nothing is
    # evicted during the prefill, so the prefill part must match; the decode part evicts (recent window).
    assert rows[0]["budget_tokens"] == 64 and rows[2]["budget_tokens"] == 13


def test_streaming_nll_without_eviction_matches_one_forward(tiny):
    model, tokenizer = tiny
    windows = texts.text_windows(texts.token_stream(tokenizer, TEXT), 2, 40)
    from h2o_cache import H2OCache

    cache = H2OCache(model.config, heavy_budget=40, recent_budget=40)  # larger than everything fed
    nll, n = perplexity.streaming_nll(model, windows, 20, cache)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, 20:-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 21:].reshape(-1),
                                            reduction="sum").item()
    assert n == 2 * 19
    assert nll == pytest.approx(ref, rel=1e-4)


def test_retrieval_smoke(tiny):
    model, tokenizer = tiny
    rows = retrieval.run_retrieval(model, tokenizer, TEXT * 3, [("full", 1.0), ("h2o", 0.2), ("local", 0.2)],
                                 lengths=(200,), depths=(0.0, 1.0), samples=1, progress=False)
    assert [r["cases"] for r in rows] == [2, 2, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and set(r["cells"]) == {"len200_depth0", "len200_depth1"} for r in rows)
    cases = texts.passkey_cases(tokenizer, texts.token_stream(tokenizer, TEXT * 3), [200], [0.5], 2)
    assert all(len(c["input_ids"]) == 200 and c["key"] in tokenizer.decode(c["input_ids"]) for c in cases)


def test_report_and_targets(tiny, tmp_path):
    model, tokenizer = tiny
    results = quality.evaluate(model, tokenizer, tasks=["perplexity", "retrieval"],
                               policies=["full", "h2o", "local", "streaming", "random"], budgets=[0.2, 0.5],
                               text=TEXT * 3, prompt_len=48, gen_len=4, windows=1, retrieval_lengths=[200],
                               retrieval_depths=[0.5], retrieval_samples=1, progress=False)
    paths = write_report(results, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == 2 * 9
    assert any(b["target"].startswith("perplexity: h2o @ 20% within") for b in data["targets"])
    md = paths["md"].read_text()
    assert "| policy | 20% | 50% |" in md and "## targets" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "perplexity.png").stat().st_size > 0 and (tmp_path / "retrieval.png").stat().st_size > 0


def test_task_builder_is_reproducible(tmp_path):
    from h2o_cache.models import reference_text

    a = write_tasks(tmp_path / "a", text=reference_text(), docs=5, seed=3)
    b = write_tasks(tmp_path / "b", text=reference_text(), docs=5, seed=3)
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_text() == pb.read_text()
    mc = [json.loads(x) for x in (tmp_path / "a" / "h2o_mc.jsonl").read_text().splitlines()]
    assert len(mc) == 5 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in mc)
    cloze = [json.loads(x) for x in (tmp_path / "a" / "h2o_cloze.jsonl").read_text().splitlines()]
    assert all(d["target"].strip() in d["context"] for d in cloze)  # the answer is recoverable from context


# ---- lm-eval ------------------------------------------------------------------------------------------------------
def test_lm_eval_wrapper_runs_local_tasks(tiny):
    pytest.importorskip("lm_eval")
    from h2o_cache.eval.lm_eval_model import run_lm_eval

    model, tokenizer = tiny
    metrics = run_lm_eval(model, tokenizer, tasks=list(LOCAL_TASKS), policy="h2o", budget=0.2, limit=2)
    assert {"h2o_cloze/acc", "h2o_mc/acc", "h2o_passkey/exact_match[first_number]"} <= set(metrics)
    full = run_lm_eval(model, tokenizer, tasks=["h2o_mc"], policy="full", budget=1.0, limit=2)
    assert "h2o_mc/acc_norm" in full


def test_standard_task_runs_from_a_local_export(tiny, tmp_path):
    """lm-eval's own COPA (its prompt functions, choices and metric) on a local JSONL, through the H2O wrapper."""
    pytest.importorskip("lm_eval")
    from h2o_cache.eval.lm_eval_model import run_lm_eval
    from h2o_cache.eval.lm_eval_tasks import localize_standard_task

    docs = [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
             "choice2": "He got a hole in his sock.", "question": "cause", "label": 0, "idx": 0},
            {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.",
             "choice2": "The liquid in the bottle poured out.", "question": "effect", "label": 1, "idx": 1}]
    data = tmp_path / "copa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    name = localize_standard_task("copa", data, tmp_path / "tasks")
    assert name == "copa_local"
    raw = run_lm_eval(*tiny, tasks=[name], policy="h2o", budget=0.2, include_path=str(tmp_path / "tasks"), raw=True)
    assert raw["results"][name]["acc,none"] in (0.0, 0.5, 1.0)
    assert raw["n-samples"][name]["effective"] == 2
    with pytest.raises(ValueError, match="data_file="):
        localize_standard_task("copa", tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(ValueError, match="task='no_such_task'"):
        localize_standard_task("no_such_task", data, tmp_path)


@pytest.mark.parametrize("policy", ["h2o", "local"])
def test_lm_eval_full_budget_equals_plain_hflm(tiny, policy):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from h2o_cache.eval.lm_eval_model import H2OLM

    model, tokenizer = tiny
    pairs = [("The quick brown fox jumps over the lazy", " dog."), ("The quick brown fox jumps over the lazy", " cat"),
             ("Pack my box with five", " dozen liquor jugs."), ("x", "y")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests, disable_tqdm=True)
    ours = H2OLM(pretrained=model, tokenizer=tokenizer, policy=policy, budget=1.0).loglikelihood(
        requests, disable_tqdm=True)
    for (lp_a, g_a), (lp_b, g_b) in zip(plain, ours, strict=True):
        assert lp_b == pytest.approx(lp_a, abs=1e-4, rel=1e-5)
        assert g_a == g_b
    # A small budget really evicts: the scores change.
    small = H2OLM(pretrained=model, tokenizer=tokenizer, policy=policy, budget=0.1).loglikelihood(
        requests[:1], disable_tqdm=True)
    assert small[0][0] != pytest.approx(plain[0][0], abs=1e-4)


@pytest.mark.parametrize("policy", ["full", "h2o"])
def test_lm_eval_generate_until_uses_the_policy_cache_and_counts_its_bytes(tiny, policy):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from h2o_cache.eval.caches import cache_config
    from h2o_cache.eval.lm_eval_model import H2OLM

    model, tokenizer = tiny
    context = "Pack my box with five dozen liquor jugs. " * 4
    # The random model's favourite token is EOS: suppress it so that a dozen tokens are really generated.
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False, "suppress_tokens": [tokenizer.eos_token_id]}
    lm = H2OLM(pretrained=model, tokenizer=tokenizer, policy=policy, budget=0.25, batch_size=1)
    [text] = lm.generate_until([Instance("generate_until", {}, (context, gen), 0)], disable_tqdm=True)
    # The same text as transformers' own generate with that cache.
    ids = tokenizer(context, return_tensors="pt").input_ids
    kwargs = ({} if policy == "full" else
              {"cache_implementation": "h2o", "cache_config": cache_config(policy, 0.25, ids.shape[1])})
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              suppress_tokens=[tokenizer.eos_token_id], **kwargs)
    assert expected.shape[1] == ids.shape[1] + 12
    assert text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]
    assert text.strip()
    # Bytes held vs an fp16 cache of the same tokens: the tiny model runs in fp32 (200% for the full cache).
    share = lm.kv_usage["kv_bytes"] / lm.kv_usage["fp16_bytes"]
    assert share == pytest.approx(2.0) if policy == "full" else 0.3 < share < 1.2


def test_lm_eval_rejects_bad_options(tiny):
    pytest.importorskip("lm_eval")
    from h2o_cache.eval.lm_eval_model import H2OLM

    model, tokenizer = tiny
    with pytest.raises(ValueError, match="policy"):
        H2OLM(pretrained=model, tokenizer=tokenizer, policy="lru")
    with pytest.raises(ValueError, match="budgets"):
        H2OLM(pretrained=model, tokenizer=tokenizer, budget=0)


@pytest.mark.integration
def test_embedded_model_h2o_vs_local(smollm):
    """On the real model, a quick look: H2O's streaming perplexity at 20% is no worse than local's."""
    model, tokenizer = smollm
    rows = perplexity.run_perplexity(model, tokenizer, texts.load_text(), [("full", 1.0), ("h2o", 0.2), ("local", 0.2)],
                                  prompt_len=256, gen_len=16, windows=1, progress=False)
    full, h2o, local = (r["perplexity"] for r in rows)
    assert h2o <= local * 1.05
    assert full < 100
