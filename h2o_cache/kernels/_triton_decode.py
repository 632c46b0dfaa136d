"""Triton kernels of the fused H2O decode step (imported only through ``h2o_cache.kernels.decode``).

Two launches per layer and step, FlashDecoding-style:

1. ``partial``: grid ``(B * Hkv, splits)``. A program owns one KV head and one contiguous partition of the kept
   slots; it holds all G query heads of the KV head as the rows of one tile (GQA packing: K and V are read once
   for the group), runs an online softmax over the partition, and writes its partial max, sum and unnormalised
   output, plus the scaled (masked) logits of its slots.
2. ``combine``: same grid. Every program rebuilds the global log-sum-exp of each query head from the splits'
   partials (a few numbers), turns its partition's stored logits into probabilities, aggregates them over the
   group's heads (mean or max) into the slots' mass; split 0 also rescales and sums the partial outputs.

Storing the logits (4 bytes per query head and slot) instead of recomputing them costs far less traffic than a
second read of the keys (2 x head_dim bytes per slot).

``UPCAST`` converts loaded tiles to float32 before any arithmetic. Triton's CPU interpreter (``TRITON_INTERPRET=1``,
how CI tests these kernels) computes wrong results from bfloat16 operands (checked with 3.9: a 16 x 16 bf16
``tl.dot`` was off by 1e10), so the interpreter runs the float32 variant; on the GPU the operands stay in their
dtype and the tensor cores accumulate in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Masked slots get the float32 minimum, as in the torch path, not -inf: a row whose every slot is masked then
# softmaxes to the same uniform distribution in both paths instead of NaN. -inf is kept for tile lanes past the end.
# A constexpr: Triton's compiler refuses a kernel that reads a plain global (its interpreter does not, which is how
# the first GPU run failed after passing every CPU test; tests/test_kernel.py now compiles for sm_90 on CPU too).
NEG = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def partial_kernel(
    Q, K, V, KV_VALID, LOGITS, PM, PL, PACC,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh,
    S, HKV, NUM_SPLITS, split_size, scaling,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    HAS_VALID: tl.constexpr, NEED_MASS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G

    q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, S)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        in_range = offs < end
        k = tl.load(k_base + offs[:, None] * stride_ks + offs_d[None, :], mask=in_range[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scaling
        if HAS_VALID:
            valid = tl.load(KV_VALID + b * stride_mb + h * stride_mh + offs, mask=in_range, other=0)
            s = tl.where(valid[None, :] != 0, s, NEG)
        s = tl.where(in_range[None, :], s, float("-inf"))
        if NEED_MASS:
            tl.store(LOGITS + (bh * G + offs_g)[:, None] * S + offs[None, :], s,
                     mask=g_mask[:, None] & in_range[None, :])
        # Every partition's first tile holds a real slot, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs[:, None] * stride_vs + offs_d[None, :], mask=in_range[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    part = (bh * NUM_SPLITS + split) * BLOCK_G
    tl.store(PM + part + offs_g, m_i)
    tl.store(PL + part + offs_g, l_i)
    tl.store(PACC + (part + offs_g)[:, None] * D + offs_d[None, :], acc)


@triton.jit
def combine_kernel(
    LOGITS, PM, PL, PACC, OUT, MASS, Q_VALID,
    stride_ob, stride_oh,
    S, HKV, NUM_SPLITS, split_size,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    HAS_QVALID: tl.constexpr, NEED_MASS: tl.constexpr, MEAN: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    base = bh * NUM_SPLITS * BLOCK_G

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(PM + base + s * BLOCK_G + offs_g))
    total = tl.zeros([BLOCK_G], tl.float32)
    for s in range(0, NUM_SPLITS):
        w = tl.exp(tl.load(PM + base + s * BLOCK_G + offs_g) - m)
        total += tl.load(PL + base + s * BLOCK_G + offs_g) * w

    if split == 0:
        out = tl.zeros([BLOCK_G, D], tl.float32)
        for s in range(0, NUM_SPLITS):
            w = tl.exp(tl.load(PM + base + s * BLOCK_G + offs_g) - m)
            part = tl.load(PACC + (base + s * BLOCK_G + offs_g)[:, None] * D + offs_d[None, :])
            out += part * w[:, None]
        out = out / total[:, None]
        tl.store(OUT + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=g_mask[:, None])

    if NEED_MASS:
        keep = 1.0
        if HAS_QVALID:
            keep = (tl.load(Q_VALID + b) != 0).to(tl.float32)
        start = split * split_size
        end = tl.minimum(start + split_size, S)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + offs_n
            in_range = offs < end
            lg = tl.load(LOGITS + (bh * G + offs_g)[:, None] * S + offs[None, :],
                         mask=g_mask[:, None] & in_range[None, :], other=float("-inf"))
            p = tl.exp(lg - m[:, None]) / total[:, None]
            p = tl.where(g_mask[:, None], p, 0.0)
            if MEAN:
                agg = tl.sum(p, 0) / G
            else:
                agg = tl.max(p, 0)
            tl.store(MASS + bh * S + offs, agg * keep, mask=in_range)
