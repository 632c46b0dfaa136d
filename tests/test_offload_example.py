"""The example script, the H2O cache combination, and the integration checks on the embedded model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from h2o_cache import offload

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "offload_hotcold.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("offload_hotcold_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_runs_tiny_and_matches_dense():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", "--profile-tokens", "256", "--new-tokens", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "100% equal to the dense model's" in proc.stdout


def test_offload_with_h2o_cache():
    out = _load_example().main(["--tiny", "--profile-tokens", "256", "--new-tokens", "6", "--h2o",
                                "--sparsity", "0.3"])
    assert out.shape == (1, 24 + 6)


@pytest.mark.integration
def test_embedded_exact_split_mlp_and_logits(smollm):
    model, tok = smollm
    ids = tok(offload.read_texts()[0][:2000], return_tensors="pt").input_ids[:, :128]
    inputs, outputs = {}, {}

    def keep(i):
        def hook(_module, args, output):
            inputs[i], outputs[i] = args[0], output

        return hook

    hooks = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    prof = offload.profile(model, list(ids.view(-1, 64)), progress=False)
    plan = offload.place(prof, int(0.3 * prof.ffn_bytes()))
    offload.dispatch(model, plan)
    try:
        assert offload.placement_report(model)["cpu"] == plan.hot_bytes
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                # Only the fp32 summation order differs (hot + cold): within 1e-5 of the layer's output scale
                # (SmolLM2's outputs span 1e-3 .. 2e4, so a fixed absolute tolerance would mean nothing).
                diff = (layer.mlp(inputs[i]) - outputs[i]).abs().max()
                assert diff <= 1e-5 * outputs[i].abs().max(), (i, float(diff))
            logits = model(input_ids=ids).logits
        assert logits.argmax(-1).eq(ref.argmax(-1)).all()
    finally:
        offload.restore(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
