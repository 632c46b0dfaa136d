"""Quantised storage of what H2O keeps: packed integer keys/values, and the decode step that reads them in place.

``QuantizedH2OLayer`` is an ``H2OLayer`` (chosen by ``H2OCache`` when ``H2OConfig.kv_bits`` is set) whose slots
live in two regions, in this order along the slot axis:

- the *packed* region, ``P`` slots: codes packed ``8 // kv_bits`` a byte (``qkeys``, ``qvalues``) with 16-bit
  scales and zero points (``h2o_cache.quant``). Values are quantised per token (groups of ``kv_group_size``
  channels); keys per channel by default (KIVI: one scale per channel over a group of ``kv_group_size``
  consecutive slots, so outlier channels keep their own range) or per token (``kv_key_axis="token"``);
- the *residual* region, ``keys``/``values`` in the model's dtype: the newest ``residual`` tokens in position
  order (``kv_residual``, at most the protected recent window of an evicting policy), plus the scratch slot.

Eviction, policies and scoring do not see the regions: the bookkeeping (``scores``, ``positions``, ``valid``)
spans all ``P + residual (+1)`` slots, and a decode step is the base layer's step with one change of who moves
where. The new token is written to the scratch slot (full precision); after attention, the victim is chosen
among all slots as before. Because the residual is inside the protected window, the victim is a packed slot or
the residual's oldest token (the *mover*): the mover is quantised into the victim's slot (or dropped, when it is
the victim itself) and the residual shifts by one. Every (sequence, head) shifts in lockstep, so the regions
keep one size for the whole batch and no host sync is needed.

Per-channel keys against per-(sequence, head) eviction: a token's slot can be overwritten at any step, while a
channel's scale belongs to a group of slots. The scheme chosen: groups are formed once, when the prompt's kept
tokens are packed (KIVI's groups of ``kv_group_size`` tokens, in position order); a token that later moves into
a slot joins that slot's group, whose per-channel grid *widens* (never shrinks) to cover it, and the group's
other members are requantised from their dequantised values on the new grid (``_write_key_group``: O(group x
head_dim) per head and step). A mover inside the grid leaves every code and scale as it was, so members drift
only when the range grows, by at most half a new step. The first try, quantising the mover on the group's grid
clamped, lost too much: on SmolLM2 18.5% of the movers' key channels fell outside their victim group's range
(by about five steps where they did), and H2O at 64% of the tokens with int4 keys per channel went from +3.5%
(no quantisation) to +6.0% perplexity clamped, +4.3% widened (per-token keys: +4.1%). A KVQuant-style scale
fixed from the whole prompt per channel would cover movers but with one coarse step for all of a head's tokens.

Steps of several tokens (prefill, chunked prefill, a continued conversation) attend in full precision with the
backend: the packed region is dequantised into the residual first (``_unpack_all``), the base layer appends,
evicts and orders as without quantisation, and then everything but the newest ``residual`` tokens is packed
again. The stored prompt is thus quantised once, after the prompt has attended to itself exactly (as
transformers' ``QuantizedCache`` does); tokens that live through a later multi-token step are requantised from
their dequantised values, which reproduces their codes wherever their group is unchanged. Without eviction
(``keep_all``, or before the budget is reached) the residual grows and whole groups are packed as they fill.

A one-query step over a packed region goes to ``packed_decode_attention``: logits chunk by chunk over the packed
slots (dequantised one chunk at a time), one softmax over all ``S`` slots per head, then values chunk by chunk,
in float32; the attention mass returned is of those probabilities, i.e. of the dequantised keys attention used.
The fused Triton decode kernel (``h2o_cache.kernels.decode``) does not read packed storage; a quantised layer
never uses it.
"""

from __future__ import annotations

from typing import Any

import torch

from . import quant
from .cache import H2OLayer
from .config import H2OConfig
from .scoring import _combine_heads

_NEG = torch.finfo(torch.float32).min
# Packed slots dequantised at once by the decode step: 512 ran 5-15% faster than 128, 256 or 1024 (batch 4,
# 3 KV heads, head_dim 64, CPU), and a chunk of float32 keys then stays within a few MiB.
DECODE_CHUNK_SLOTS = 512


class QuantizedH2OLayer(H2OLayer):
    """An ``H2OLayer`` whose kept tokens are stored as packed ``kv_bits``-bit integers (see the module docstring)."""

    # A decode step branches in Python on the regions' sizes and packs with data-dependent shapes.
    is_compileable = False
    _BYTE_GROUPS = {
        "keys": ("keys", "qkeys"),
        "values": ("values", "qvalues"),
        "quant_params": ("key_scale", "key_zero", "value_scale", "value_zero"),
        "bookkeeping": ("scores", "positions", "valid"),
    }
    _STATE = (*H2OLayer._STATE, "residual")

    def __init__(self, h2o_config: H2OConfig, layer_idx: int, prompt_length: int | None = None):
        super().__init__(h2o_config, layer_idx, prompt_length)
        self.bits = h2o_config.kv_bits
        self.group = h2o_config.kv_group_size
        self.key_axis = -2 if h2o_config.kv_key_axis == "channel" else -1
        self.residual: int | None = None  # fixed with the budget at the first update
        self.qkeys: torch.Tensor | None = None  # [B, H, P, D * bits / 8] uint8
        self.qvalues: torch.Tensor | None = None
        self.key_scale: torch.Tensor | None = None  # [B, H, ceil(P / G), D] (channel) or [B, H, P, D / G] (token)
        self.key_zero: torch.Tensor | None = None
        self.value_scale: torch.Tensor | None = None  # [B, H, P, D / G]
        self.value_zero: torch.Tensor | None = None
        self._relayout = False  # the slots need ordering by position before packing (after a base eviction)

    @property
    def packed_slots(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.shape[-2]

    def _num_slots(self) -> int:
        return self.packed_slots + self.keys.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        dim = key_states.shape[-1]
        if dim % self.group:
            raise ValueError(
                f"H2OConfig: kv_group_size={self.group} must divide the model's head dimension {dim} (values are "
                "quantised in groups of one token's channels); choose a divisor of it"
            )
        per_byte = 8 // self.bits
        if dim % per_byte:
            raise ValueError(
                f"H2OConfig: kv_bits={self.bits} packs {per_byte} values a byte, which the head dimension {dim} "
                f"does not allow; choose kv_bits among {[b for b in quant.BITS if dim % (8 // b) == 0]}"
            )
        super().lazy_initialization(key_states, value_states)

    # ---- steps ----------------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] > 1 and self.packed_slots and not self.awaiting_attention:
            self._unpack_all()  # several tokens attend with the backend, over full-precision keys
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.residual is None:
            self.residual = min(self.h2o_config.kv_residual, max(self.recent, 1))
        return keys, values

    def after_attention(self, mass: torch.Tensor | None) -> None:
        super().after_attention(mass)
        self._pack_old()

    def _evict_to_budget(self) -> None:
        self._unpack_all()
        super()._evict_to_budget()
        self._relayout = True

    def _evict_one(self) -> None:
        victim = self._priority().argmin(dim=-1, keepdim=True)  # [B, H, 1]
        p = self.packed_slots
        if self.valid is not None and bool((victim > p).any()):
            # Padding inside the residual (a row shorter than the window) was chosen: take the base layer's
            # path over full-precision slots and pack again.
            self._unpack_all()
            super()._evict_one()
            self._relayout = True
            return
        # The residual's oldest token (slot p) moves into the victim's slot, then the residual shifts by one.
        for name in ("scores", "positions", "valid"):
            t = getattr(self, name)
            if t is not None:
                t.scatter_(2, victim, t[:, :, p : p + 1].clone())
                t[:, :, p:-1] = t[:, :, p + 1 :].clone()
        if p:
            self._write_packed(victim.clamp_max(p - 1), victim < p, self.keys[:, :, :1], self.values[:, :, :1])
        self.keys[:, :, :-1] = self.keys[:, :, 1:].clone()
        self.values[:, :, :-1] = self.values[:, :, 1:].clone()
        self.evicted += 1

    def _write_packed(self, slot: torch.Tensor, where: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Quantise one token per (sequence, head) (``key``/``value`` ``[B, H, 1, D]``) into packed ``slot``
        (``[B, H, 1]``) where ``where`` holds."""
        vcodes, vscale, vzero = quant.quantize(value, self.bits, self.group, -1)
        if self.key_axis == -1:
            kcodes, kscale, kzero = quant.quantize(key, self.bits, self.group, -1)
            self._scatter("key_scale", slot, where, kscale)
            self._scatter("key_zero", slot, where, kzero)
            self._scatter("qkeys", slot, where, quant.pack(kcodes, self.bits))
        else:
            self._write_key_group(slot, where, key)
        self._scatter("qvalues", slot, where, quant.pack(vcodes, self.bits))
        self._scatter("value_scale", slot, where, vscale)
        self._scatter("value_zero", slot, where, vzero)

    def _write_key_group(self, slot: torch.Tensor, where: torch.Tensor, key: torch.Tensor) -> None:
        """Per-channel keys: ``key`` joins the group of ``slot``, whose grid widens (never shrinks) to cover it;
        the group's other members are requantised on the new grid (unchanged where the grid is)."""
        g, p = self.group, self.packed_slots
        group = slot // g  # [B, H, 1]
        start = group * g
        local = torch.arange(g, device=slot.device)
        members = (start + local).clamp_max(p - 1)  # [B, H, G]; a last, partial group repeats its last slot
        gindex = group[..., None].expand(-1, -1, -1, key.shape[-1])
        scale, zero = self.key_scale.gather(2, gindex), self.key_zero.gather(2, gindex)  # [B, H, 1, D]
        codes = quant.unpack(self.qkeys.gather(2, members[..., None].expand(-1, -1, -1, self.qkeys.shape[-1])),
                             self.bits)
        values = codes.float() * scale.float() + zero.float()
        values.scatter_(2, (slot - start)[..., None].expand(-1, -1, -1, key.shape[-1]), key.float())
        # Repeated slots of a partial group take the last real member's value, so they write identical codes.
        last = (p - 1 - start).clamp_max(g - 1)
        values = values.gather(2, torch.minimum(local, last)[..., None].expand_as(values))
        top = zero.float() + scale.float() * quant.levels(self.bits)
        new_scale, new_zero = quant.grid(torch.minimum(zero.float(), key.float()), torch.maximum(top, key.float()),
                                         self.bits, scale.dtype)
        packed = quant.pack(quant.quantize_with(values, new_scale, new_zero, self.bits), self.bits)
        idx = members[..., None].expand(-1, -1, -1, self.qkeys.shape[-1])
        self.qkeys.scatter_(2, idx, torch.where(where[..., None], packed, self.qkeys.gather(2, idx)))
        self._scatter("key_scale", group, where, new_scale)
        self._scatter("key_zero", group, where, new_zero)

    def _scatter(self, name: str, slot: torch.Tensor, where: torch.Tensor, src: torch.Tensor) -> None:
        t = getattr(self, name)
        index = slot[..., None].expand(-1, -1, -1, t.shape[-1])
        t.scatter_(2, index, torch.where(where[..., None], src, t.gather(2, index)))

    # ---- regions --------------------------------------------------------------------------------------------
    def _unpack_all(self) -> None:
        """Dequantise the packed region into the residual (full precision), leaving no packed slot."""
        p = self.packed_slots
        if not p:
            return
        self.keys = torch.cat([self.dequantized_keys(0, p).to(self.keys.dtype), self.keys], dim=-2)
        self.values = torch.cat([self.dequantized_values(0, p).to(self.values.dtype), self.values], dim=-2)
        for names in (self._BYTE_GROUPS["quant_params"], ("qkeys", "qvalues")):
            for name in names:
                setattr(self, name, None)

    def _pack_old(self) -> None:
        """Pack every full-precision token older than the residual (whole key groups only while growing)."""
        if self.slot_mode:
            if self.packed_slots:
                return  # a decode step keeps the layout
            if self._relayout and self.positions is not None:
                # Live slots in position order (the scratch stays last), so the newest ones form the residual.
                live = self.budget
                order = self.positions[:, :, :live].argsort(dim=-1)
                order = torch.cat([order, order.new_full((*order.shape[:2], 1), live)], dim=-1)
                self._apply(lambda t: t.gather(2, order if t.dim() == 3 else
                                               order[..., None].expand(-1, -1, -1, t.shape[-1])))
            self._relayout = False
            count = self.budget - self.residual
        else:
            count = self.keys.shape[-2] - self.residual
            if self.key_axis == -2:
                count -= count % self.group
        if count <= 0:
            return
        old_k, old_v = self.keys[:, :, :count], self.values[:, :, :count]
        kcodes, kscale, kzero = quant.quantize(old_k, self.bits, self.group, self.key_axis)
        vcodes, vscale, vzero = quant.quantize(old_v, self.bits, self.group, -1)
        new = {"qkeys": quant.pack(kcodes, self.bits), "qvalues": quant.pack(vcodes, self.bits),
               "key_scale": kscale, "key_zero": kzero, "value_scale": vscale, "value_zero": vzero}
        for name, tensor in new.items():
            old = getattr(self, name)
            setattr(self, name, tensor if old is None else torch.cat([old, tensor], dim=2))
        self.keys = self.keys[:, :, count:].contiguous()
        self.values = self.values[:, :, count:].contiguous()

    def dequantized_keys(self, start: int, end: int) -> torch.Tensor:
        """Packed slots ``start:end`` of the keys as float32 ``[B, H, end - start, D]`` (``start`` a multiple
        of ``kv_group_size`` for per-channel keys)."""
        codes = quant.unpack(self.qkeys[:, :, start:end], self.bits)
        if self.key_axis == -1:
            return quant.dequantize(codes, self.key_scale[:, :, start:end], self.key_zero[:, :, start:end],
                                    self.group, -1)
        g0, g1 = start // self.group, -(-end // self.group)
        return quant.dequantize(codes, self.key_scale[:, :, g0:g1], self.key_zero[:, :, g0:g1], self.group, -2)

    def dequantized_values(self, start: int, end: int) -> torch.Tensor:
        codes = quant.unpack(self.qvalues[:, :, start:end], self.bits)
        return quant.dequantize(codes, self.value_scale[:, :, start:end], self.value_zero[:, :, start:end],
                                self.group, -1)


def packed_decode_attention(
    layer: QuantizedH2OLayer,
    query: torch.Tensor,
    *,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    need_mass: bool = True,
    aggregation: str = "mean",
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per sequence over a layer's packed + residual slots: ``(output [B, 1, Hq, D], mass [B, Hkv, S])``,
    as ``h2o_cache.scoring.attention_with_mass`` computes them over the dequantised keys and values."""
    bsz, hq, q_len, dim = query.shape
    hkv = layer.keys.shape[1]
    groups = hq // hkv
    p = layer.packed_slots
    slots = p + layer.keys.shape[-2]
    chunk = max(layer.group, DECODE_CHUNK_SLOTS // layer.group * layer.group)
    q = (query.float() * scaling).view(bsz, hkv, groups * q_len, dim)
    logits = torch.empty(bsz, hkv, groups * q_len, slots, dtype=torch.float32, device=query.device)
    for start in range(0, p, chunk):
        end = min(p, start + chunk)
        logits[..., start:end] = torch.matmul(q, layer.dequantized_keys(start, end).transpose(-1, -2))
    logits[..., p:] = torch.matmul(q, layer.keys.float().transpose(-1, -2))
    if key_valid is not None:
        logits.masked_fill_(~key_valid[:, :, None, :], _NEG)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs[..., p:], layer.values.float())
    for start in range(0, p, chunk):
        end = min(p, start + chunk)
        out += torch.matmul(probs[..., start:end], layer.dequantized_values(start, end))
    out = out.view(bsz, hq, q_len, dim).transpose(1, 2).to(query.dtype)
    mass = None
    if need_mass:
        probs5 = probs.view(bsz, hkv, groups, q_len, slots)
        if query_valid is not None:
            probs5 = probs5.masked_fill(~query_valid[:, None, None, :, None], 0.0)
        mass = _combine_heads(probs5, aggregation)
    return out, mass
