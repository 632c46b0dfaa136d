"""h2o_cache.quant: bit packing round trips exactly, quantisation errors stay within half a step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o_cache import quant


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(quant.BITS), rows=st.integers(1, 5), bytes_=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, bytes_, seed):
    n = bytes_ * 8 // bits
    codes = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    packed = quant.pack(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, bytes_)
    assert torch.equal(quant.unpack(packed, bits), codes.to(torch.uint8))


def test_pack_refuses_a_width_it_cannot_fill():
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack(torch.zeros(3, 6, dtype=torch.uint8), 2)


def _step(scale: torch.Tensor, group: int, axis: int, tokens: int) -> torch.Tensor:
    """Each element's quantisation step, broadcast to the quantised tensor's shape."""
    if axis == -1:
        return scale.float().repeat_interleave(group, dim=-1)
    return scale.float().repeat_interleave(group, dim=-2)[..., :tokens, :]


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(quant.BITS),
    axis=st.sampled_from(quant.AXES),
    group=st.sampled_from([1, 2, 4, 8]),
    tokens=st.integers(1, 19),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantisation_error_is_at_most_half_a_step(bits, axis, group, tokens, magnitude, dtype, seed):
    x = (torch.randn(2, 3, tokens, 8, generator=torch.Generator().manual_seed(seed)) * magnitude).to(dtype)
    codes, scale, zero = quant.quantize(x, bits, group, axis)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) <= quant.levels(bits)
    assert scale.dtype == zero.dtype == quant.param_dtype(dtype)
    assert scale.shape == ((2, 3, tokens, 8 // group) if axis == -1 else (2, 3, -(-tokens // group), 8))
    back = quant.dequantize(codes, scale, zero, group, axis)
    step = _step(scale, group, axis, tokens)
    # Half a step, plus float32 rounding of the affine map (relative to the magnitudes involved).
    slack = 1e-6 * (x.float().abs() + zero.float().abs().max() + step * quant.levels(bits))
    assert ((back - x.float()).abs() <= step / 2 + slack).all()


def test_constant_groups_are_exact_and_clamping_holds_the_grid():
    x = torch.full((1, 1, 4, 8), 0.375)
    codes, scale, zero = quant.quantize(x, 4, 4, -2)
    assert (codes == 0).all() and (scale == 0).all()
    assert torch.equal(quant.dequantize(codes, scale, zero, 4, -2), x)
    # A value beyond a given grid is clamped to its end, never wrapped around.
    y = torch.tensor([[-5.0, 0.5, 99.0]])
    codes = quant.quantize_with(y, torch.tensor(0.1, dtype=torch.float16), torch.tensor(0.0, dtype=torch.float16), 4)
    assert codes.tolist() == [[0, 5, 15]]
