"""The attention step of an H2O layer: output for the model, attention mass for the cache, then eviction.

``h2o_cache.patches`` wraps the attention functions transformers dispatches to (``sdpa``, ``eager``,
``flash_attention_*``); a wrapper hands the call here only when its module's layer is pending in an
``H2OCache`` (see ``h2o_cache.cache``), and otherwise calls the original function untouched.

- Prefill of an empty layer: the backend's own kernel computes the output, exactly as without H2O (the mask
  transformers built is complete there); the mass comes from the eager weights if the backend returned them,
  else from the chunked recomputation in ``h2o_cache.scoring`` (no L x L matrix). One exception: an unmasked
  (causal, unpadded) prefill on CPU takes output and mass from the same chunked pass. On CPU sdpa's kernel is
  no faster than two BLAS matmuls, so recomputing the logits for the mass beside it cost more than computing the
  output from the same probabilities (1.5x vs 2.6x of sdpa's time at batch 4 x 4096 tokens, measured).
- Every other step (decoding, chunked prefill, a continued conversation): stored tokens are per-head and
  non-contiguous, which transformers' single mask cannot describe, so output and mass come from one chunked pass
  that masks stored tokens with the layer's own validity and new tokens causally.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .cache import H2OLayer
from .kernels.decode import decode_attention_with_mass
from .quantized import QuantizedH2OLayer, packed_decode_attention
from .scoring import attention_with_mass, chunk_size_for, mass_from_weights
from .support import check_attention_call

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# Every layer of a step receives the same mask object: read the new tokens' padding from it once.
_last_mask: tuple[weakref.ref | None, int, torch.Tensor | None] = (None, 0, None)


def new_token_validity(attention_mask: torch.Tensor | None, n_new: int) -> torch.Tensor | None:
    """``[B, n_new]`` bool, False where a new token is padding; ``None`` when all are real.

    Works for every mask transformers hands to attention functions: ``None`` (no padding), the 4-D boolean
    (sdpa) or additive float (eager) mask, whose column ``k - n_new + i`` is new token ``i`` (see
    ``H2OLayer.get_mask_sizes``) and whose diagonal entry is False exactly when that token is padding, and the
    2-D padding mask of FlashAttention.
    """
    global _last_mask
    if attention_mask is None:
        return None
    compiling = torch.compiler.is_compiling()
    if not compiling:  # a traced step never reads the eager-side cache (dynamo would guard on it)
        ref, cached_n, cached = _last_mask
        if ref is not None and ref() is attention_mask and cached_n == n_new:
            return cached
    if attention_mask.dim() == 2:
        valid = attention_mask[:, -n_new:].bool()
    elif attention_mask.dim() == 4:
        rows = torch.arange(n_new, device=attention_mask.device).clamp_max(attention_mask.shape[2] - 1)
        cols = attention_mask.shape[-1] - n_new + torch.arange(n_new, device=attention_mask.device)
        diagonal = attention_mask[:, 0, rows, cols]
        if diagonal.dtype == torch.bool:
            valid = diagonal
        else:
            valid = diagonal > torch.finfo(diagonal.dtype).min / 2
    else:
        raise ValueError(f"H2O attention: unexpected attention mask of shape {tuple(attention_mask.shape)}")
    if compiling:
        # A traced step cannot branch on the mask's values (a host sync and a graph break): it always masks.
        return valid
    result = None if bool(valid.all()) else valid
    _last_mask = (weakref.ref(attention_mask), n_new, result)
    return result


def h2o_attention(
    layer: H2OLayer,
    backend_name: str,
    backend: AttentionFn,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one H2O layer's step; returns ``(output [B, q, Hq, D], None)``."""
    check_attention_call(module, kwargs)
    config = layer.h2o_config
    n_new, k_len = query.shape[2], key.shape[2]
    new_valid = new_token_validity(attention_mask, n_new)
    layer.mark_new_tokens_valid(new_valid)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    chunk = config.prefill_chunk_size or chunk_size_for(
        query.shape[0], query.shape[1], k_len, config.chunk_bytes(query.device.type)
    )
    need_mass = layer.policy.needs_scores
    common = dict(
        scaling=scaling,
        key_valid=layer.key_valid(),
        query_valid=new_valid,
        chunk_size=chunk,
        aggregation=config.gqa_aggregation,
        # Gemma 2's logit softcapping and GPT-OSS's attention sinks, as the model's attention applies them.
        softcap=kwargs.get("softcap"),
        sinks=kwargs.get("s_aux"),
    )

    prefill = k_len == n_new and n_new > 1
    single_pass = need_mass and attention_mask is None and query.device.type == "cpu" and backend_name != "eager"
    if prefill and not single_pass:
        output, weights = backend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mass = None
        # Eager's weights are rounded to the model dtype: usable as scores only in float32.
        if need_mass and weights is not None and weights.dtype == torch.float32:
            mass = mass_from_weights(weights, key.shape[1], new_valid, config.gqa_aggregation)
        elif need_mass:
            _, mass = attention_with_mass(query, key, None, **common)
    elif isinstance(layer, QuantizedH2OLayer) and layer.packed_slots:
        # A one-query step over packed storage (multi-token steps unpack first): read in place, chunk by chunk.
        output, mass = packed_decode_attention(layer, query, need_mass=need_mass, **common)
    else:
        # One-query steps on CUDA run the fused Triton kernel when it applies (h2o_cache.kernels.decode; off with
        # H2O_FUSED_DECODE=0); everything else takes attention_with_mass.
        output, mass = decode_attention_with_mass(query, key, value, need_mass=need_mass, **common)
    layer.after_attention(mass)
    return output, None
