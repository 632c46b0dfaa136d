"""Layer streaming (CPU memory and per-layer files, with and without prefetch)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from h2o_cache import offload
from h2o_cache.offload.streaming import read_safetensors

IDS = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(3))


def build():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def test_read_safetensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).half()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    back = read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_streaming_generates_like_dense_and_removes(tmp_path, disk, prefetch):
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.generate(IDS, max_new_tokens=5, do_sample=False)
    s = offload.stream_layers(model, offload_dir=tmp_path if disk else None, prefetch=prefetch)
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    if disk:
        assert len(list(tmp_path.glob("h2o-stream-*/layer_*.safetensors"))) == 3
    with torch.no_grad():
        out = model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    assert s.stats.loads == 3 * 5
    assert s.stats.prefetch_hits == (3 * 5 - 1 if prefetch else 0)
    assert model.model.layers[2].mlp.up_proj.weight.device.type == "meta"  # dropped after use
    s.remove()
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_streaming_subset_and_with_hotcold():
    model = build()
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    prof = offload.profile(model, list(IDS), progress=False)
    offload.dispatch(model, offload.place(prof, prof.ffn_bytes() // 3))
    s = offload.stream_layers(model, layers=[0, 2])
    assert model.model.layers[1].mlp.hot_in.device.type == "cpu"
    assert model.model.layers[2].mlp.hot_in.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=1e-5)
    s.remove()
    offload.restore(model)
    with pytest.raises(ValueError, match="layers"):
        offload.stream_layers(model, layers=[5])
