"""Prefill in micro-batches, decode as one batch: how a small KV cache turns into a large batch.

A long prompt's prefill holds activations of every prompt token at once (on SmolLM2-135M about 110 MB per
4096-token sequence, more than the 38 MB of KV an H2O cache keeps for it at 20%). Prefilled all together, a batch
is therefore limited by those activations, not by the cache. Prefilling ``micro_batch`` sequences at a time and
concatenating their caches bounds the activations by one micro-batch; the decode that follows runs the whole
batch at once, which is where a batch pays (the weights are read once per step for every sequence). This is the
schedule of FlexGen, on which the H2O paper measured its throughput.

Usage with ``generate``: prefill all but the last prompt token, then pass the whole prompt and the cache::

    cache, _ = prefill_in_micro_batches(model, ids[:, :-1], lambda: H2OCache(model.config, prompt_length=n),
                                        micro_batch=4, attention_mask=mask[:, :-1])
    model.generate(ids, attention_mask=mask, past_key_values=cache, ...)   # `cache=` on transformers >= 5.24
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .cache import H2OCache
from .compat import cache_kwargs


def concatenate_caches(caches: Sequence[Any], *, release: bool = False) -> Any:
    """One cache holding the sequences of ``caches`` in order: ``H2OCache`` or plain (full-attention)
    ``DynamicCache`` objects of prompts with one padded width.

    ``release=True`` empties each source layer once it is copied: joining then needs one layer of extra memory,
    not a second copy of every cache (which, for a full cache, would double the peak it is measured by).
    """
    if caches and all(isinstance(c, H2OCache) for c in caches):
        return H2OCache.concatenate(caches, release=release)
    if caches and all(type(c) is DynamicCache and all(type(layer) is DynamicLayer for layer in c.layers)
                      for c in caches):
        out = DynamicCache()
        for i in range(len(caches[0].layers)):
            out.update(torch.cat([c.layers[i].keys for c in caches]), torch.cat([c.layers[i].values for c in caches]),
                       i)
            if release:
                for c in caches:
                    c.layers[i] = DynamicLayer()
        return out
    raise ValueError(
        "concatenate_caches: expects H2OCache objects, or DynamicCache objects with full-attention layers only, "
        f"all of one kind (got {sorted({type(c).__name__ for c in caches}) or 'nothing'})"
    )


# no_grad rather than inference_mode: generate() updates the cache in place afterwards, which inference tensors
# allow outside inference_mode only after a copy (H2OLayer makes it, once; a caller may still wrap this call).
@torch.no_grad()
def prefill_in_micro_batches(
    model: Any,
    input_ids: torch.Tensor,
    new_cache: Callable[[], Any],
    *,
    micro_batch: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor]:
    """Prefill ``input_ids`` (``[batch, length]``) ``micro_batch`` rows at a time into fresh caches from
    ``new_cache()``, and concatenate them.

    Returns ``(cache, logits)``: the batch's cache, having seen every token, and the logits of each row's last
    token (``[batch, vocab]``). Each row's cache is what a whole-batch prefill would give it, up to float
    rounding.
    """
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    caches, logits = [], []
    for start in range(0, input_ids.shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        cache = new_cache()
        mask = None if attention_mask is None else attention_mask[rows]
        out = model(input_ids=input_ids[rows], attention_mask=mask, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(cache))
        caches.append(cache)
        logits.append(out.logits[:, -1])
    return (caches[0] if len(caches) == 1 else concatenate_caches(caches, release=True)), torch.cat(logits)
