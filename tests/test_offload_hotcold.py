"""Hot/cold split FFNs: exactness, placement bytes, sparse mode, restore (tiny random Llama/OPT models)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from h2o_cache import offload
from h2o_cache.offload import HotColdMLP


def build(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            mlp_bias=True)).eval()
    return OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                    vocab_size=100, word_embed_proj_dim=64, max_position_embeddings=64)).eval()


IDS = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(2))


def plan_for(model, frac=0.3, **kw):
    prof = offload.profile(model, list(IDS), progress=False)
    return offload.place(prof, int(frac * prof.ffn_bytes()), **kw)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_exact_split_equals_dense_and_restores(family):
    model = build(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        ref_gen = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    plan = plan_for(model, min_per_layer=8)
    offload.dispatch(model, plan)
    assert len([m for m in model.modules() if isinstance(m, HotColdMLP)]) == 2
    with torch.no_grad():
        out = model(input_ids=IDS).logits
        gen = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(gen, ref_gen)
    offload.restore(model)
    assert not any(isinstance(m, HotColdMLP) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_allocated_bytes_equal_plan(family):
    from accelerate.utils import compute_module_sizes

    model = build(family)
    plan = plan_for(model, frac=0.4)
    offload.dispatch(model, plan)
    report = offload.placement_report(model)
    assert report["cpu"] == plan.hot_bytes
    assert report["cpu"] + report["cold_cpu"] == plan.ffn_bytes
    # What Accelerate's max_memory accounting sees of each FFN is exactly its hot part.
    sizes = compute_module_sizes(model)
    prefix = "model.layers" if family == "llama" else "model.decoder.layers"
    name = "mlp" if family == "llama" else "fc1"
    for i in range(2):
        expect = len(plan.hot[i]) * plan.neuron_bytes[i] + plan.fixed_bytes[i]
        assert sizes[f"{prefix}.{i}.{name}"] == expect
        mod = model.get_submodule(f"{prefix}.{i}.{name}")
        assert sorted(mod.hot_index.tolist()) == plan.hot[i]
        assert mod.cold_in.device.type == "cpu"


def test_inferred_device_map_counts_hot_part():
    """max_memory decides placement from the hot bytes (the map is only computed: no CUDA needed)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    from h2o_cache.offload.hotcold import split_ffns

    model = build("llama")
    dense_sizes = compute_module_sizes(model)
    split_ffns(model, plan_for(model, frac=0.2))
    sizes = compute_module_sizes(model)
    assert sizes["model.layers.0"] < dense_sizes["model.layers.0"]
    # Room for the embeddings, layer 0 and Accelerate's reserve for one offloaded layer: layer 1 spills to the CPU.
    room = sizes["model.embed_tokens"] + 2 * sizes["model.layers.0"] + 64
    kw = dict(max_memory={0: room, "cpu": 10**9}, no_split_module_classes=model._no_split_modules)
    dmap = infer_auto_device_map(model, **kw)
    assert dmap["model.layers.0"] == 0 and dmap["model.layers.1"] == "cpu"
    # The same room does not hold a dense layer 0: the map really counts only the hot part.
    dense_map = infer_auto_device_map(build("llama"), **kw)
    owner = max((k for k in dense_map if k == "" or "model.layers.0".startswith(k + ".") or k == "model.layers.0"),
                key=len)
    assert dense_map[owner] == "cpu"


def test_sparse_mode_hits_target_and_zero_sparsity_is_exact():
    model = build("llama")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    offload.dispatch(model, plan_for(model, frac=0.2))
    thr = offload.calibrate_thresholds(model, list(IDS), 0.5)
    assert len(thr) == 2 and all(t > 0 for t in thr)
    offload.set_mode(model, "sparse", thr)
    with torch.no_grad():
        prefill = model(input_ids=IDS).logits
    assert 0.4 < offload.measured_sparsity(model) < 0.6
    assert not torch.allclose(prefill, ref, atol=1e-5)
    # The decode path (gather) and the prefill path (mask) compute the same thing for one token.
    offload.set_mode(model, "sparse", thr)
    with torch.no_grad():
        one = model(input_ids=IDS[:1, :1]).logits
    mlp = model.model.layers[0].mlp
    mlp_in = torch.randn(1, 64)
    dense_masked = mlp._cold_sparse(mlp_in.expand(12, 64).contiguous())[:1]
    torch.testing.assert_close(mlp._cold_sparse(mlp_in), dense_masked, rtol=1e-5, atol=1e-6)
    assert one.shape == (1, 1, 100)
    offload.set_mode(model, "sparse", [0.0, 0.0])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=1e-5)


def test_opt_sparse_relu_zero_threshold_skips_only_zeros():
    model = build("opt")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    offload.dispatch(model, plan_for(model, frac=0.2), mode="sparse", thresholds=[0.0, 0.0])
    with torch.no_grad():
        out = model(input_ids=IDS[:, :1]).logits
        full = model(input_ids=IDS).logits
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-5)
    assert out.shape[1] == 1 and offload.measured_sparsity(model) > 0.2  # ReLU zeros were skipped


def test_bad_inputs():
    model = build("llama")
    plan = plan_for(model)
    with pytest.raises(ValueError, match="mode"):
        offload.dispatch(model, plan, mode="fast")
    with pytest.raises(ValueError, match="thresholds"):
        offload.dispatch(model, plan, mode="sparse")
    with pytest.raises(ValueError, match="restore"):
        offload.restore(model)
    other = offload.place(offload.profile(build("opt"), list(IDS), progress=False), 10**5)
    with pytest.raises(ValueError, match="plan does not fit"):
        offload.dispatch(model, other)
    offload.dispatch(model, plan)
    with pytest.raises(ValueError, match="restore"):
        offload.dispatch(model, plan)
    with pytest.raises(ValueError, match="one value per layer"):
        offload.set_mode(model, "sparse", [1.0])
    with pytest.raises(ValueError, match="sparsity"):
        offload.calibrate_thresholds(model, list(IDS), 1.5)


def test_dispatch_from_saved_plan_with_cpu_max_memory(tmp_path):
    model = build("opt")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    plan_for(model).save(tmp_path / "plan.json")
    offload.dispatch(model, tmp_path / "plan.json", max_memory={"cpu": 10**9})
    assert set(model.h2o_offload.device_map.values()) == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        offload.dispatch(build("opt"), tmp_path / "plan.json", max_memory={"cpu": 10**9}, device_map={"": "cpu"})


@pytest.mark.gpu
def test_cuda_split_device_map_spills_hot_layer_to_cpu_offload():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from accelerate.utils import compute_module_sizes

    from h2o_cache.offload.hotcold import split_ffns

    probe = build("llama")
    plan = plan_for(probe, frac=0.3)
    split_ffns(probe, plan)
    sizes = compute_module_sizes(probe)
    room = sizes["model.embed_tokens"] + 2 * sizes["model.layers.0"] + 64
    model = build("llama")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    offload.dispatch(model, plan, max_memory={0: room, "cpu": 10**9})
    assert model.h2o_offload.device_map["model.layers.1"] == "cpu"  # Accelerate copies it in per forward
    with torch.no_grad():
        out = model(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    offload.restore(model)


@pytest.mark.gpu
def test_cuda_dispatch_places_hot_on_gpu_and_cold_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build("llama")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    plan = plan_for(model, frac=0.3)
    offload.dispatch(model, plan, max_memory={0: "1GiB", "cpu": "4GiB"})
    report = offload.placement_report(model)
    assert report["cuda:0"] == plan.hot_bytes and "cpu" not in report
    mlp = model.model.layers[0].mlp
    assert mlp.cold_in.device.type == "cpu" and mlp.cold_in.is_pinned()
    with torch.no_grad():
        out = model(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    offload.restore(model)
    assert model.model.layers[0].mlp.gate_proj.weight.device.type == "cuda"


@pytest.mark.gpu
def test_cuda_streaming_matches_dense():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build("llama").cuda()
    ids = IDS.cuda()
    with torch.no_grad():
        ref = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    s = offload.stream_layers(model, device="cuda:0")
    with torch.no_grad():
        out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref) and s.stats.prefetch_hits > 0
    s.remove()
