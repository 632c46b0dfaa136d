"""Profiler and placement of hot neurons (tiny random Llama/OPT models)."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from h2o_cache import offload
from h2o_cache.offload.cli import main as cli_main
from h2o_cache.offload.cli import parse_budget, register_cli


def tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_opt():
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                    vocab_size=100, word_embed_proj_dim=64, max_position_embeddings=64)).eval()


def windows(n=6, length=16):
    return list(torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(1)))


def test_profile_llama_matches_manual_mass_and_roundtrips(tmp_path):
    model = tiny_llama()
    w = windows()
    prof = offload.profile(model, w, batch_size=4, progress=False, model_name="tiny")
    assert prof.tokens_seen == 6 * 16 and prof.n_layers == 2 and prof.kind == "gated"
    # Recompute layer 0's |act(gate)*up| by hand from the embeddings.
    acts = []
    h = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    with torch.no_grad():
        model(input_ids=torch.stack(w), use_cache=False)
    h.remove()
    mlp = model.model.layers[0].mlp
    x = acts[0].reshape(-1, 64)
    a = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs()
    torch.testing.assert_close(prof.mass[0], a.sum(0).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(prof.counts[0], (a > a.mean(-1, keepdim=True)).sum(0))
    prof.save(tmp_path / "p.pt")
    back = offload.NeuronProfile.load(tmp_path / "p.pt")
    assert back.model_name == "tiny" and back.tokens_seen == prof.tokens_seen
    assert torch.equal(back.mass[1], prof.mass[1]) and back.ffn_bytes() == prof.ffn_bytes() == 2 * 128 * 3 * 64 * 4


def test_profile_opt_relu_counts_positive_activations():
    model = tiny_opt()
    prof = offload.profile(model, windows(), progress=False)
    assert prof.kind == "plain" and prof.fire_rule == "act>0"
    acts = []
    h = model.model.decoder.layers[1].fc2.register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    with torch.no_grad():
        model(input_ids=torch.stack(windows()), use_cache=False)
    h.remove()
    assert torch.equal(prof.counts[1], (acts[0].reshape(-1, 128) > 0).sum(0))
    # fc1 and fc2 biases: neuron = 2*64 weights + 1 bias; the fc2 bias is a fixed cost.
    assert prof.neuron_bytes == [(2 * 64 + 1) * 4] * 2 and prof.fixed_bytes == [64 * 4] * 2


def test_profile_rejects_bad_metric():
    with pytest.raises(ValueError, match="metric"):
        offload.profile(tiny_llama(), windows(), metric="nope", progress=False)


@pytest.fixture
def prof():
    return offload.profile(tiny_llama(num_hidden_layers=3), windows(), progress=False)


def test_greedy_is_optimal_top_k_and_respects_budget(prof):
    budget = prof.ffn_bytes() // 4
    plan = offload.place(prof, budget)
    assert plan.hot_bytes <= budget
    k = sum(len(h) for h in plan.hot)
    assert k == budget // prof.neuron_bytes[0]
    # Equal costs: the optimum is the global top-k by mass.
    all_mass = torch.cat(prof.mass)
    best = all_mass.topk(k).values.sum() / all_mass.sum()
    assert plan.captured == pytest.approx(float(best), rel=1e-9)


def test_ilp_per_neuron_matches_greedy_and_honours_min(prof):
    budget = prof.ffn_bytes() // 4
    greedy = offload.place(prof, budget)
    ilp = offload.place(prof, budget, solver="ilp", group_size=1)
    assert ilp.captured == pytest.approx(greedy.captured, rel=1e-6)
    ilp_min = offload.place(prof, budget, solver="ilp", min_per_layer=20, group_size=4)
    greedy_min = offload.place(prof, budget, min_per_layer=20)
    assert min(len(h) for h in ilp_min.hot) >= 20 and min(len(h) for h in greedy_min.hot) >= 20
    assert ilp_min.hot_bytes <= budget and ilp_min.captured <= greedy.captured + 1e-12


def test_place_bad_inputs(prof):
    with pytest.raises(ValueError, match="solver"):
        offload.place(prof, 1000, solver="lp")
    with pytest.raises(ValueError, match="min_per_layer"):
        offload.place(prof, 10, min_per_layer=5)
    with pytest.raises(ValueError, match="score"):
        offload.place(prof, 1000, score="weights")


def test_plan_roundtrip_and_capture_curve(prof, tmp_path):
    plan = offload.place(prof, prof.ffn_bytes() // 2, score="count")
    plan.save(tmp_path / "plan.json")
    assert offload.PlacementPlan.load(tmp_path / "plan.json") == plan
    curve = offload.capture_curve(prof, [0.0, 0.1, 0.5, 1.0])
    caps = [c for _, _, c in curve]
    assert caps[0] == 0.0 and caps[-1] == pytest.approx(1.0) and caps == sorted(caps)
    assert caps[1] > 0.1  # hot neurons are denser in mass than a uniform pick


def test_parse_budget():
    assert parse_budget("30%", 1000) == 300
    assert parse_budget("2KiB", 0) == 2048
    assert parse_budget("5e3", 0) == 5000
    with pytest.raises(ValueError, match="budget"):
        parse_budget("lots", 0)


def test_cli_place_and_help(prof, tmp_path, capsys):
    prof.save(tmp_path / "p.pt")
    assert cli_main(["place", "--profile", str(tmp_path / "p.pt"), "--budget", "25%", "--solver", "ilp",
                     "--out", str(tmp_path / "plan.json"), "--curve", "0.1,0.5"]) == 0
    out = capsys.readouterr().out
    assert "captured" in out and "50.0" in out
    plan = offload.PlacementPlan.load(tmp_path / "plan.json")
    assert plan.solver == "ilp" and plan.hot_bytes <= prof.ffn_bytes() // 4
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_cli(sub)
    for name, p in sub.choices.items():
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings} has no help"


def test_cli_profile_on_saved_model(tmp_path, capsys):
    from transformers import AutoTokenizer

    from h2o_cache.models import EMBEDDED_NAME, cache_home

    folder = cache_home() / EMBEDDED_NAME
    if not (folder / "tokenizer_config.json").exists():
        pytest.skip("needs the embedded model's tokenizer (converted once by h2o_cache.models.load_model())")
    tok = AutoTokenizer.from_pretrained(folder)
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.jsonl").write_text('{"text": "def f(x):\\n    return x + 1\\n' * 1 + '"}\n' +
                                      '{"text": "' + "The quick brown fox jumps over the lazy dog. " * 40 + '"}\n')
    assert cli_main(["profile", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.jsonl"),
                     "--seq-len", "32", "--max-tokens", "256", "--out", str(tmp_path / "p.pt")]) == 0
    prof = offload.NeuronProfile.load(tmp_path / "p.pt")
    assert prof.tokens_seen == 256 and prof.source.endswith("t.jsonl") and "profiled 256 tokens" in capsys.readouterr().out
