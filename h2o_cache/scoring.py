"""Attention mass per cached token, without the L x L attention matrix.

H2O ranks tokens by the softmax attention they have received. Fast kernels (sdpa, FlashAttention) never expose
that matrix, so it is recomputed here in query chunks: every chunk holds complete softmax rows over the keys its
queries can see (causality bounds that to the chunk's end), so a chunk needs O(chunk x L) memory and the column
sums are exact. A decode step is a single chunk of one query: one q.K^T, softmax, P.V.

Query heads are packed per KV head (GQA/MQA): the G query heads sharing a KV head become G x q rows of one matrix
product against that head's keys, so keys are never repeated. The G heads' attention then combines into the KV
head's score by ``mean`` (default) or ``max``, per query, before summing over queries.

Two score modifiers of current models are reproduced exactly as their eager attention computes them: logit
softcapping (Gemma 2: ``logits = cap * tanh(logits / cap)`` after scaling, before masking) and per-head attention
sinks (GPT-OSS's ``s_aux``: one extra logit per query head in the softmax denominator, attending to nothing). The
mass is the attention really computed, so a sink's share is in the denominator and credited to no token.
"""

from __future__ import annotations

import torch

_NEG = torch.finfo(torch.float32).min
_FP16_HEADROOM = 256.0


# Past ~128 queries per chunk nothing is gained, and the causal skipping gets coarse (keys beyond a chunk's last
# query are skipped for the whole chunk).
MAX_CHUNK = 128


def chunk_size_for(batch: int, query_heads: int, key_length: int, target_bytes: int) -> int:
    """Queries per chunk: at most ``MAX_CHUNK``, fewer if one chunk's float32 block would exceed ``target_bytes``."""
    per_query = max(1, batch * query_heads * key_length * 4)
    return max(1, min(MAX_CHUNK, target_bytes // per_query))


def attention_with_mass(
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
    """Causal attention of the last ``q`` keys' queries over all keys, plus the attention mass each key received.

    Args:
        query: ``[B, Hq, q, D]``; the queries of the newest ``q`` tokens.
        key, value: ``[B, Hkv, k, D]`` with ``k >= q``; the last ``q`` keys belong to the queries (causal among
            themselves), the first ``k - q`` are older and visible to every query. ``value=None`` skips the output.
        key_valid: ``[B, Hkv, k]`` bool, False for padding; ``None`` means all valid.
        query_valid: ``[B, q]`` bool; rows of padding queries do not add to the mass.
        chunk_size: queries per chunk (``None``: all at once).
        aggregation: ``mean`` or ``max`` over the query heads of a group.
        softcap: logit softcapping, ``cap * tanh(logits / cap)`` (``None``: off).
        sinks: ``[Hq]`` attention-sink logits, one per query head, added to each row's softmax denominator.

    Returns:
        ``(output [B, q, Hq, D] or None, mass [B, Hkv, k] float32 or None)``.
    """
    bsz, hq, q_len, dim = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    groups = hq // hkv
    past = k_len - q_len
    chunk = q_len if chunk_size is None else max(1, min(chunk_size, q_len))
    grouped = query.view(bsz, hkv, groups, q_len, dim)

    # float16 logits overflow to inf (then NaN after softmax) past 65504, where sdpa, which accumulates in float32,
    # stays finite. The matmul computes q.k / 2^8 and the float32 logits get the 2^8 back: a power of two is exact,
    # and the range grows to ~1.7e7 at no cost in relative precision (bfloat16 has float32's range already).
    fp16_headroom = _FP16_HEADROOM if query.dtype == torch.float16 else 1.0
    outs: list[torch.Tensor] = []
    mass = torch.zeros(bsz, hkv, k_len, dtype=torch.float32, device=query.device) if need_mass else None
    key_t = key.transpose(-1, -2)
    pad_mask = None if key_valid is None else ~key_valid[:, :, None, None, :]
    # [1, Hkv, G, 1, 1]: query head h = kv_head * G + g, as in the grouped view of the queries.
    sink5 = None if sinks is None else sinks.float().view(1, hkv, groups, 1, 1)

    for start in range(0, q_len, chunk):
        end = min(q_len, start + chunk)
        rows = end - start
        visible = past + end  # keys past the chunk's last query are masked for all of its rows
        # Scaling the (small) queries instead of the (large) logits saves a pass over the logits.
        q_chunk = (grouped[:, :, :, start:end] * (scaling / fp16_headroom)).reshape(bsz, hkv, groups * rows, dim)
        logits = torch.matmul(q_chunk, key_t[..., :visible]).float()
        if fp16_headroom != 1.0:
            logits.mul_(fp16_headroom)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        logits5 = logits.view(bsz, hkv, groups, rows, visible)
        if rows > 1:  # only the chunk's own keys (its last `rows` columns) can lie in a query's future
            future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
            logits5[..., visible - rows :].masked_fill_(future, _NEG)
        if pad_mask is not None:
            logits5.masked_fill_(pad_mask[..., :visible], _NEG)
        if sink5 is None:
            probs = torch.softmax(logits, dim=-1)
        else:  # softmax over [logits, sink] without materialising the extra column
            lse = torch.logaddexp(torch.logsumexp(logits5, dim=-1, keepdim=True), sink5)
            probs = torch.exp(logits5 - lse).view_as(logits)
        if value is not None:
            outs.append(torch.matmul(probs.to(value.dtype), value[:, :, :visible]).view(bsz, hkv, groups, rows, -1))
        if mass is not None:
            probs5 = probs.view(bsz, hkv, groups, rows, visible)
            if query_valid is not None:
                probs5 = probs5.masked_fill(~query_valid[:, None, None, start:end, None], 0.0)
            mass[..., :visible] += _combine_heads(probs5, aggregation)

    out = None
    if outs:
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
        out = out.reshape(bsz, hq, q_len, -1).transpose(1, 2).contiguous()
    return out, mass


def mass_from_weights(
    weights: torch.Tensor, num_kv_heads: int, query_valid: torch.Tensor | None, aggregation: str
) -> torch.Tensor:
    """The same mass from materialised attention weights ``[B, Hq, q, k]`` (the eager backend returns them)."""
    bsz, hq, q_len, k_len = weights.shape
    probs = weights.float().view(bsz, num_kv_heads, hq // num_kv_heads, q_len, k_len)
    if query_valid is not None:
        # masked_fill, not a product: a backend may leave NaN in the rows of padding queries.
        probs = probs.masked_fill(~query_valid[:, None, None, :, None], 0.0)
    return _combine_heads(probs, aggregation)


def _combine_heads(probs: torch.Tensor, aggregation: str) -> torch.Tensor:
    """``[B, Hkv, G, q, k]`` -> ``[B, Hkv, k]``: combine a group's heads per query, then sum over queries.

    Per query, so that a prompt scored at once and the same tokens decoded one by one give the same scores.
    """
    if aggregation == "mean":
        return probs.sum(dim=3).mean(dim=2)
    return probs.amax(dim=2).sum(dim=2)
