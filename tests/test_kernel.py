"""The fused decode kernel against the torch path, on CPU through Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from h2o_cache.kernels import decode
from h2o_cache.scoring import attention_with_mass

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# Triton decides at its own import whether its builtins are interpreted, and this process may have imported it
# already (torch does, for compile): the kernel runs in a child process that sets TRITON_INTERPRET=1 first.
_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from h2o_cache.kernels.decode import fused_decode_attention
calls = torch.load(sys.argv[1])
results = []
for args, kwargs in calls:
    results.append(fused_decode_attention(*args, **kwargs))
torch.save(results, sys.argv[2])
"""


def _run_interpreted(calls, tmp_path):
    """``fused_decode_attention(*args, **kwargs)`` for each call, under the interpreter, in one child process."""
    src, dst = tmp_path / "calls.pt", tmp_path / "results.pt"
    torch.save(calls, src)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dst)


# (batch, query heads, KV heads, slots, head_dim, splits, aggregation)
CASES = {
    "gqa-split3-mean": (2, 8, 2, 150, 32, 3, "mean"),
    "mqa-split2-max": (2, 4, 1, 70, 16, 2, "max"),
    "mha-one-split": (2, 4, 4, 20, 16, 1, "mean"),
    "gqa3-split3-max": (2, 6, 2, 130, 16, 3, "max"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(batch, hq, hkv, slots, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen).to(dtype)
    k = (2 * torch.randn(batch, hkv, slots, dim, generator=gen)).to(dtype)
    v = torch.randn(batch, hkv, slots, dim, generator=gen).to(dtype)
    valid = torch.rand(batch, hkv, slots, generator=gen) > 0.3
    valid[..., -1] = True  # the step's own token
    return q, k, v, valid


def _case(name, dtype_name):
    batch, hq, hkv, slots, dim, splits, aggregation = CASES[name]
    q, k, v, valid = _inputs(batch, hq, hkv, slots, dim, DTYPES[dtype_name])
    query_valid = torch.ones(batch, 1, dtype=torch.bool)
    query_valid[0] = False  # a padding row: output computed, no mass
    kwargs = dict(scaling=dim**-0.5, key_valid=valid, query_valid=query_valid, aggregation=aggregation)
    return (q, k, v), kwargs, splits


def _extra_calls():
    q, k, v, valid = _inputs(1, 4, 2, 200, 16, torch.float32, seed=1)
    masked = valid.clone()
    masked[:, 1] = False  # every slot of one KV head masked
    return {
        "split1": ((q, k, v), dict(scaling=0.25, key_valid=valid, num_splits=1)),
        "split4": ((q, k, v), dict(scaling=0.25, key_valid=valid, num_splits=4)),
        "no-mass": ((q, k, v), dict(scaling=0.25, need_mass=False, num_splits=2)),
        "all-masked": ((q, k, v), dict(scaling=0.25, key_valid=masked, num_splits=2)),
    }


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    calls, names = [], []
    for name in CASES:
        for dtype_name in DTYPES:
            args, kwargs, splits = _case(name, dtype_name)
            calls.append((args, {**kwargs, "num_splits": splits}))
            names.append((name, dtype_name))
    for name, call in _extra_calls().items():
        calls.append(call)
        names.append(name)
    return dict(zip(names, _run_interpreted(calls, tmp_path_factory.mktemp("kernel")), strict=True))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_torch_path(kernel_results, name, dtype_name):
    args, kwargs, _ = _case(name, dtype_name)
    out, mass = kernel_results[(name, dtype_name)]
    ref_out, ref_mass = attention_with_mass(*args, **kwargs)

    _check(out, mass, ref_out, ref_mass, kwargs, dtype_name)


def _check(out, mass, ref_out, ref_mass, kwargs, dtype_name):
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert mass.shape == ref_mass.shape and mass.dtype == torch.float32
    # The torch path rounds bf16 logits and probabilities to bf16 before the products; the kernel keeps float32.
    tol = (1e-5, 1e-6) if dtype_name == "fp32" else (2e-2, 2e-3)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol[0], rtol=tol[0])
    torch.testing.assert_close(mass, ref_mass, atol=tol[1], rtol=tol[0])
    valid = kwargs["key_valid"]
    assert mass[~valid].abs().max() == 0  # padding slots get no mass
    assert mass[0].abs().max() == 0  # nor does a padding query
    total = mass[1:].sum(-1)  # a real query hands out one unit per head: mean keeps it, max at least one
    if kwargs["aggregation"] == "mean":
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-4, rtol=0)
    else:
        assert (total >= 1 - 1e-4).all()


# Llama-3-8B's heads at a 20% budget of a 32k context.
CUDA_CASES = {**CASES, "llama3-8b-32k-20pct": (2, 32, 8, 6554, 128, None, "mean")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_kernel_on_cuda_matches_torch_path(name, dtype_name):
    batch, hq, hkv, slots, dim, splits, aggregation = CUDA_CASES[name]
    q, k, v, valid = (t.cuda() for t in _inputs(batch, hq, hkv, slots, dim, DTYPES[dtype_name]))
    query_valid = torch.ones(batch, 1, dtype=torch.bool, device="cuda")
    query_valid[0] = False
    kwargs = dict(scaling=dim**-0.5, key_valid=valid, query_valid=query_valid, aggregation=aggregation)
    decode.set_fused_decode(True)
    assert decode.fused_decode_available(), "triton must import on a CUDA machine"
    out, mass = decode.decode_attention_with_mass(q, k, v, **kwargs)  # the dispatcher's own choice
    ref_out, ref_mass = attention_with_mass(q, k, v, **kwargs)
    _check(out, mass, ref_out, ref_mass, kwargs, dtype_name)
    if splits is not None:
        forced = decode.fused_decode_attention(q, k, v, num_splits=splits, **kwargs)
        _check(*forced, ref_out, ref_mass, kwargs, dtype_name)


def test_split_count_and_mass_switch(kernel_results):
    calls = _extra_calls()
    one, mass_one = kernel_results["split1"]
    four, mass_four = kernel_results["split4"]
    torch.testing.assert_close(one, four, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mass_one, mass_four, atol=1e-7, rtol=0)
    out, mass = kernel_results["no-mass"]
    ref, _ = attention_with_mass(*calls["no-mass"][0], scaling=0.25, need_mass=False)
    assert mass is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_head_matches_torch(kernel_results):
    # Both paths fall back to a uniform distribution over the head's slots, never NaN.
    args, kwargs = _extra_calls()["all-masked"]
    kwargs = {k: v for k, v in kwargs.items() if k != "num_splits"}
    out, mass = kernel_results["all-masked"]
    ref_out, ref_mass = attention_with_mass(*args, **kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, ref_mass, atol=1e-6, rtol=0)


def test_unsupported_calls_rejected_and_cpu_dispatch_uses_torch():
    q, k, v, _ = _inputs(1, 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="one query"):
        decode.fused_decode_attention(q.expand(1, 4, 2, 16), k, v, scaling=0.25)
    with pytest.raises(ValueError, match="aggregation"):
        decode.fused_decode_attention(q, k, v, scaling=0.25, aggregation="sum")
    # On CPU the dispatcher takes the torch path (the kernel runs on CUDA only).
    out, mass = decode.decode_attention_with_mass(q, k, v, scaling=0.25)
    ref_out, ref_mass = attention_with_mass(q, k, v, scaling=0.25)
    assert torch.equal(out, ref_out) and torch.equal(mass, ref_mass)


def test_switch(monkeypatch):
    monkeypatch.delenv("H2O_FUSED_DECODE", raising=False)
    monkeypatch.setattr(decode, "_enabled", False)
    assert not decode.fused_decode_available(), "off by default until it passes its CUDA tests"
    monkeypatch.setenv("H2O_FUSED_DECODE", "1")
    assert decode.fused_decode_available()
    monkeypatch.delenv("H2O_FUSED_DECODE")
    decode.set_fused_decode(True)
    assert decode.fused_decode_available()
    monkeypatch.setenv("H2O_FUSED_DECODE", "0")
    assert not decode.fused_decode_available()
    decode.set_fused_decode(False)


# Triton's interpreter accepts kernels its compiler refuses (the first GPU run failed on a plain global read in the
# kernel after every interpreted test passed), so the kernels are also compiled, down to a cubin, for the GPUs
# users have: no GPU is needed for that. (arch, dtypes): Turing T4 has no bf16; Ampere, Ada and Hopper.
_ARCHES = {75: ("fp16", "fp32"), 80: ("bf16", "fp16", "fp32"), 89: ("bf16", "fp16"), 90: ("bf16", "fp16", "fp32")}
_POINTERS = {"partial_kernel": {"Q": None, "K": None, "V": None, "KV_VALID": "u8", "LOGITS": "fp32", "PM": "fp32",
                                "PL": "fp32", "PACC": "fp32"},
             "combine_kernel": {"LOGITS": "fp32", "PM": "fp32", "PL": "fp32", "PACC": "fp32", "OUT": None,
                                "MASS": "fp32", "Q_VALID": "u8"}}


def _compile_for_cuda(kernel_name, dtype, arch, **constexprs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from h2o_cache.kernels import _triton_decode

    fn = getattr(_triton_decode, kernel_name)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS[kernel_name]:
            signature[name] = "*" + (_POINTERS[kernel_name][name] or dtype)
        else:
            signature[name] = "fp32" if name == "scaling" else "i32"
    consts = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    return triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles kernels; the interpreter is on")
@pytest.mark.parametrize("arch", list(_ARCHES))
def test_kernels_compile_for_cuda_gpus(arch):
    # The specialisations the dispatcher launches: GQA groups of 1 (MHA) to 8, head_dim 64 / 128, with and
    # without padding and mass.
    for dtype in _ARCHES[arch]:
        for groups, dim, flags in ((4, 128, True), (1, 64, False), (8, 64, True)):
            common = dict(G=groups, BLOCK_G=16, BLOCK_N=decode.BLOCK_N, D=dim, NEED_MASS=flags)
            partial = _compile_for_cuda("partial_kernel", dtype, arch, HAS_VALID=flags, IEEE=dtype == "fp32",
                                        UPCAST=False, **common)
            combine = _compile_for_cuda("combine_kernel", dtype, arch, HAS_QVALID=flags, MEAN=flags, **common)
            assert partial.asm["cubin"] and combine.asm["cubin"]
