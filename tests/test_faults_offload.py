"""Reproducers of issue #10 for the offload tools: malformed plans, shared offload folders, restore's flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from h2o_cache import offload
from h2o_cache.offload import HotColdMLP, PlacementPlan

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def build(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(mlp_bias=True)).eval()


def plan_for(model) -> PlacementPlan:
    prof = offload.profile(model, list(IDS), progress=False)
    return offload.place(prof, int(0.3 * prof.ffn_bytes()))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_intact(model, before: dict[str, torch.Tensor]) -> None:
    assert not hasattr(model, "h2o_offload")
    assert not any(isinstance(m, HotColdMLP) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: p.hot[0].extend(p.hot[0][:3]), r"plan.hot\[0\] repeats neuron indices"),
    (lambda p: p.hot[1].append(10_000), r"plan.hot\[1\] has neuron indices \[10000\] outside \[0, 128\)"),
    (lambda p: p.hot[1].append(-1), r"plan.hot\[1\] has neuron indices \[-1\]"),
    (lambda p: p.hot[1].append(1.5), r"plan.hot\[1\] must be a list of integer neuron indices"),
    (lambda p: p.n_neurons.pop(), r"plan.n_neurons has 1 entries"),
])
def test_malformed_plan_is_refused_with_the_model_intact(corrupt, match):
    model = build()
    plan = plan_for(model)
    before = snapshot(model)
    bad = copy.deepcopy(plan)
    corrupt(bad)
    with pytest.raises(ValueError, match=match):
        offload.dispatch(model, bad)
    assert_intact(model, before)
    # The model is usable again right away: the good plan dispatches and restores.
    offload.dispatch(model, plan)
    offload.restore(model)
    assert_intact(model, before)


def test_malformed_saved_plan_names_the_file(tmp_path):
    model = build()
    plan = plan_for(model)
    path = tmp_path / "plan.json"
    plan.hot[1].append(plan.hot[1][0])
    blob = json.loads(json.dumps({"format": "h2o_cache.placement/1", **plan.__dict__}))
    path.write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"plan='.*plan.json': plan.hot\[1\] repeats"):
        offload.dispatch(model, path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not an h2o-cache placement plan"):
        PlacementPlan.load(path)
    path.write_text(json.dumps({"format": "h2o_cache.placement/1", "hot": []}))
    with pytest.raises(ValueError, match="damaged placement plan"):
        PlacementPlan.load(path)
    assert not hasattr(model, "h2o_offload")


def test_failure_half_way_through_the_split_puts_back_the_split_layers(monkeypatch):
    from h2o_cache.offload import hotcold

    model = build()
    plan = plan_for(model)
    before = snapshot(model)
    real = hotcold.HotColdMLP
    calls = []

    def fail_on_second(site, hot, **kw):
        calls.append(site.index)
        if len(calls) == 2:
            raise RuntimeError("injected failure in layer 1")
        return real(site, hot, **kw)

    monkeypatch.setattr(hotcold, "HotColdMLP", fail_on_second)
    with pytest.raises(RuntimeError, match="injected"):
        offload.dispatch(model, plan)
    monkeypatch.undo()
    assert_intact(model, before)


def test_restore_gives_back_requires_grad_as_it_was():
    model = build()
    model.requires_grad_(True)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    offload.dispatch(model, plan_for(model))
    offload.restore(model)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


def test_two_models_streamed_from_one_offload_dir_stay_apart(tmp_path):
    a, b = build(0), build(1)
    a_before, b_before = snapshot(a), snapshot(b)
    with torch.no_grad():
        ref_a, ref_b = a(input_ids=IDS).logits, b(input_ids=IDS).logits
    sa = offload.stream_layers(a, device="cpu", offload_dir=tmp_path)
    sb = offload.stream_layers(b, device="cpu", offload_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=IDS).logits, ref_a, rtol=0, atol=0)
        torch.testing.assert_close(b(input_ids=IDS).logits, ref_b, rtol=0, atol=0)
    sa.remove()
    sb.remove()
    sa.remove()  # a second remove() is a no-op
    for model, before in ((a, a_before), (b, b_before)):
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(tmp_path.iterdir()) == []  # each streamer removed its own files


def test_streaming_failure_half_way_leaves_the_model_whole(tmp_path, monkeypatch):
    from h2o_cache.offload import streaming

    model = build()
    before = snapshot(model)
    real, calls = streaming.save_file, []

    def disk_full(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(state, path)

    monkeypatch.setattr(streaming, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        offload.stream_layers(model, device="cpu", offload_dir=tmp_path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(tmp_path.iterdir()) == []
    assert not model.model.layers[0]._forward_pre_hooks


def test_streaming_an_already_streamed_model_is_refused():
    model = build()
    streamer = offload.stream_layers(model, device="cpu")
    with pytest.raises(ValueError, match="already streamed"):
        offload.stream_layers(model, device="cpu")
    streamer.remove()


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: not a JSON record"):
        offload.read_texts(path)
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected a JSON object"):
        offload.read_texts(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        offload.read_texts(path)


def test_profile_load_refuses_foreign_files(tmp_path):
    path = tmp_path / "p.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"profile='.*p.pt' is not an h2o-cache neuron profile"):
        offload.NeuronProfile.load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        offload.NeuronProfile.load(tmp_path / "missing.pt")


def test_profile_load_refuses_a_damaged_profile(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"format": "h2o_cache.neuron_profile/1", "meta": json.dumps({"model_name": "x"})}, path)
    with pytest.raises(ValueError, match="damaged h2o-cache neuron profile"):
        offload.NeuronProfile.load(path)
