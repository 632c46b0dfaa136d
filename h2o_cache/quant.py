"""Integer KV quantisation as pure tensor functions: asymmetric min/max groups, and bit packing into bytes.

A group of values ``x`` becomes ``codes = round((x - zero) / scale)`` in ``[0, 2^bits - 1]`` with
``zero = min(x)`` and ``scale = (max(x) - min(x)) / (2^bits - 1)``, both stored in 16 bits (``float16``, or
``bfloat16`` for bfloat16 tensors, whose range float16 lacks). The 16-bit parameters are rounded outwards (zero
down, scale up) so that every value of the group stays inside the grid: the error is at most ``scale / 2``.

Groups run along one axis of a ``[..., tokens, dim]`` tensor:

- ``axis=-1`` (per token): ``group_size`` consecutive channels of one token share a scale; parameters are
  ``[..., tokens, dim / group_size]``. ``group_size`` must divide ``dim``.
- ``axis=-2`` (per channel): ``group_size`` consecutive tokens share one scale per channel; parameters are
  ``[..., ceil(tokens / group_size), dim]`` (a last, partial group takes its own min/max).

Codes are packed along the last axis, ``8 // bits`` codes per byte, the first code in the lowest bits.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)
AXES = (-1, -2)


def levels(bits: int) -> int:
    return (1 << bits) - 1


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type of scales and zero points for tensors of ``dtype``."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8`` codes ``[..., n]`` (each < 2^bits) -> ``uint8`` bytes ``[..., n * bits / 8]``."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"pack: the last axis ({codes.shape[-1]}) must be a multiple of {per} for {bits}-bit codes")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = grouped[..., 0].clone()
    for j in range(1, per):
        out |= grouped[..., j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: ``uint8`` bytes ``[..., m]`` -> ``uint8`` codes ``[..., m * 8 / bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & levels(bits)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _grouped(x: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """``x`` viewed with the grouped axis split into ``[groups, group_size]`` (tokens padded by repetition)."""
    if axis == -1:
        if x.shape[-1] % group_size:
            raise ValueError(f"kv_group_size={group_size} must divide the head dimension {x.shape[-1]}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    tokens = x.shape[-2]
    pad = -tokens % group_size
    if pad:  # repeating the last token leaves the partial group's min/max unchanged
        x = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
    return x.reshape(*x.shape[:-2], x.shape[-2] // group_size, group_size, x.shape[-1])


def _ungrouped(g: torch.Tensor, tokens: int, axis: int) -> torch.Tensor:
    if axis == -1:
        return g.reshape(*g.shape[:-2], -1)
    return g.reshape(*g.shape[:-3], -1, g.shape[-1])[..., :tokens, :]


def grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` in ``dtype`` of the smallest grid covering ``[lo, hi]`` (float32), rounded outwards."""
    zero = lo.to(dtype)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, zero.new_tensor(-float("inf"))), zero)
    scale = ((hi - zero.float()) / levels(bits)).to(dtype)
    short = zero.float() + scale.float() * levels(bits) < hi
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(float("inf"))), scale)
    return scale, zero


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., tokens, dim]`` -> ``(codes uint8 like x, scale, zero)`` (see the module docstring)."""
    reduce = -1 if axis == -1 else -2
    g = _grouped(x.float(), group_size, axis)
    scale, zero = grid(g.amin(dim=reduce), g.amax(dim=reduce), bits, param_dtype(x.dtype))
    codes = _codes(g, scale.unsqueeze(reduce), zero.unsqueeze(reduce), bits)
    return _ungrouped(codes, x.shape[-2], axis), scale, zero


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``x`` on a given grid (``scale``/``zero`` broadcast against ``x``), clamped to it."""
    return _codes(x.float(), scale, zero, bits)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # a constant group: every code 0, value = zero
    return ((x - zero.float()) * inv).round_().clamp_(0, levels(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, axis: int = -1
               ) -> torch.Tensor:
    """``codes [..., tokens, dim]`` and their group parameters -> float32 values."""
    if axis == -1:
        g = codes.reshape(*codes.shape[:-1], scale.shape[-1], -1).float()
        return (g * scale.float()[..., None] + zero.float()[..., None]).reshape(codes.shape)
    index = torch.arange(codes.shape[-2], device=codes.device) // group_size
    return codes.float() * scale.float().index_select(-2, index) + zero.float().index_select(-2, index)
