"""The decode step's attention and per-slot attention mass in one fused Triton kernel.

``decode_attention_with_mass`` takes the arguments of ``h2o_cache.scoring.attention_with_mass`` and returns the
same ``(output [B, 1, Hq, D], mass [B, Hkv, S] float32)``. It runs the kernel (``_triton_decode``) for one-query
steps on CUDA when triton is installed, and the torch path otherwise. Triton is imported on first use only, so
this module imports, and the package runs, without it.

The kernel is OFF by default: it matches the torch path through Triton's CPU interpreter (tests/test_kernel.py),
but its first run on a real GPU (H100, 2026-11-26) failed tests/test_kernel.py's CUDA cases. The cause, found
afterwards without a GPU by compiling the kernels for sm_75..sm_90 on CPU (now a CI test): the kernel read a
plain Python global, which Triton's compiler refuses and its interpreter accepts. The kernels now compile to
cubins; their numbers on a GPU are still unchecked, so the switch stays off until a GPU run passes. ``H2O_FUSED_DECODE=1`` in the environment (read at each call) or ``set_fused_decode(True)`` turns it
on; ``H2O_FUSED_DECODE=0`` keeps it off whatever the process set.

The kernel reads each kept slot's key and value once per step: all query heads of a KV head are rows of one tile
(GQA/MQA packing), and the slots are split into partitions processed by separate programs (split-K, as in
FlashDecoding) so that a batch of few KV heads still fills the GPU at long budgets.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from ..scoring import attention_with_mass

logger = logging.getLogger(__name__)

_enabled = False
_AGGREGATIONS = ("mean", "max")
_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_N = 64


def set_fused_decode(enabled: bool) -> None:
    """Turn the fused decode kernel on or off for this process (``H2O_FUSED_DECODE``, when set, wins)."""
    global _enabled
    _enabled = bool(enabled)


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    try:
        from . import _triton_decode
    except ImportError as exc:  # triton missing or broken: the torch path serves every call
        logger.info("fused decode kernel unavailable (%s); using the torch path", exc)
        return None
    return _triton_decode


def fused_decode_available() -> bool:
    """True when the fused kernel is switched on and triton imports."""
    env = os.environ.get("H2O_FUSED_DECODE")
    on = _enabled if env is None else env != "0"
    return on and _kernels() is not None


def _supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, aggregation: str) -> bool:
    return (
        value is not None
        and query.shape[2] == 1
        and query.shape[-1] in _HEAD_DIMS
        and query.shape[1] % key.shape[1] == 0
        and query.dtype in _DTYPES
        and key.dtype == query.dtype
        and value.dtype == query.dtype
        and key.shape[2] > 0
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and aggregation in _AGGREGATIONS
    )


def decode_attention_with_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    *,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    chunk_size: int | None = None,
    need_mass: bool = True,
    aggregation: str = "mean",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``attention_with_mass`` through the fused kernel where it applies (one query, CUDA, triton), else torch."""
    # Under torch.compile the torch path is traced instead: inductor fuses it into its own kernels. The kernel has
    # no softcapping or sinks: those steps take the torch path.
    if (
        softcap is None
        and sinks is None
        and query.is_cuda
        and not torch.compiler.is_compiling()
        and _supported(query, key, value, aggregation)
        and fused_decode_available()
    ):
        return fused_decode_attention(
            query, key, value, scaling=scaling, key_valid=key_valid, query_valid=query_valid,
            need_mass=need_mass, aggregation=aggregation,
        )
    return attention_with_mass(
        query, key, value, scaling=scaling, key_valid=key_valid, query_valid=query_valid,
        chunk_size=chunk_size, need_mass=need_mass, aggregation=aggregation, softcap=softcap, sinks=sinks,
    )


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(programs: int, slots: int, device: torch.device) -> int:
    """Partitions per KV head: enough programs for about two waves of the GPU, at least one tile each."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device)
    wanted = max(1, (2 * sms + programs - 1) // programs)
    return max(1, min(wanted, (slots + BLOCK_N - 1) // BLOCK_N))


def fused_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    need_mass: bool = True,
    aggregation: str = "mean",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel itself, on any device triton can launch on (CPU tensors under ``TRITON_INTERPRET=1``).

    ``num_splits`` forces the number of slot partitions per KV head (default: sized to the GPU).
    """
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("fused_decode_attention needs triton (pip install 'h2o-cache[gpu]')")
    if not _supported(query, key, value, aggregation):
        raise ValueError(
            "fused_decode_attention: needs one query per sequence, head_dim in "
            f"{_HEAD_DIMS}, matching dtypes in {_DTYPES}, aggregation in {_AGGREGATIONS}"
        )
    bsz, hq, _, dim = query.shape
    hkv, slots = key.shape[1], key.shape[2]
    groups = hq // hkv
    block_g = max(16, _next_power_of_2(groups))
    splits = num_splits or _num_splits(bsz * hkv, slots, query.device)
    split_size = -(-slots // splits)
    split_size = -(-split_size // BLOCK_N) * BLOCK_N  # whole tiles, so no partition is empty
    splits = -(-slots // split_size)

    q = query[:, :, 0, :]
    if q.stride(-1) != 1:
        q = q.contiguous()
    dev = query.device
    f32 = torch.float32
    logits = torch.empty(bsz * hkv * groups * slots if need_mass else 1, dtype=f32, device=dev)
    pm = torch.empty(bsz * hkv * splits * block_g, dtype=f32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(bsz * hkv * splits * block_g * dim, dtype=f32, device=dev)
    out = torch.empty(bsz, 1, hq, dim, dtype=value.dtype, device=dev)
    mass = torch.empty(bsz, hkv, slots, dtype=f32, device=dev) if need_mass else pm
    if key_valid is not None and key_valid.stride(-1) != 1:
        key_valid = key_valid.contiguous()
    valid = key_valid.view(torch.uint8) if key_valid is not None else pm
    valid_strides = (valid.stride(0), valid.stride(1)) if key_valid is not None else (0, 0)
    qvalid = query_valid[:, -1].to(torch.uint8).contiguous() if query_valid is not None else pm

    grid = (bsz * hkv, splits)
    kernels.partial_kernel[grid](
        q, key, value, valid, logits, pm, pl, pacc,
        q.stride(0), q.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *valid_strides,
        slots, hkv, splits, split_size, float(scaling),
        G=groups, BLOCK_G=block_g, BLOCK_N=BLOCK_N, D=dim,
        HAS_VALID=key_valid is not None, NEED_MASS=need_mass, IEEE=query.dtype == torch.float32,
        UPCAST=query.device.type == "cpu",
    )
    kernels.combine_kernel[grid](
        logits, pm, pl, pacc, out, mass, qvalid,
        out.stride(0), out.stride(2),
        slots, hkv, splits, split_size,
        G=groups, BLOCK_G=block_g, BLOCK_N=BLOCK_N, D=dim,
        HAS_QVALID=query_valid is not None, NEED_MASS=need_mass, MEAN=aggregation == "mean",
    )
    return out, (mass if need_mass else None)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
