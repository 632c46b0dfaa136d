"""Streaming perplexity: windows of real text; the first ``prompt_len`` tokens are prefilled (the cache evicts
down to the budget at the end of the prefill), then the next ``gen_len`` tokens are fed ONE AT A TIME and scored,
so every scored token is predicted through the compressed cache and eviction happens at every decode step. The
prediction made by the prefill's last position (which still attended to the whole prompt) is not scored."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from h2o_cache.compat import cache_kwargs
from h2o_cache.runner import fp16_kv_bytes, kv_bytes

from .caches import FULL, budget_tokens, make_cache
from .texts import text_windows, token_stream

logger = logging.getLogger(__name__)


@torch.inference_mode()
def streaming_nll(model: Any, windows: torch.Tensor, prompt_len: int, cache: Any, *, progress: bool = False
                  ) -> tuple[float, int]:
    """Summed NLL and token count of ``windows[:, prompt_len + 1:]``, each token predicted one step at a time.

    The prompt is prefilled (the cache evicts to its budget there); token ``prompt_len`` is then fed alone, its
    logits predict token ``prompt_len + 1``, and so on: every scored prediction reads the compressed cache.
    """
    if not 0 < prompt_len < windows.shape[1] - 1:
        raise ValueError(f"prompt_len must be in (0, {windows.shape[1] - 1}), got {prompt_len}")
    windows = windows.to(model.device)
    model(input_ids=windows[:, :prompt_len], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    total, count = 0.0, 0
    steps = range(prompt_len, windows.shape[1] - 1)
    for i in tqdm(steps, desc="decode", leave=False, disable=not progress):
        out = model(input_ids=windows[:, i : i + 1], **cache_kwargs(cache), use_cache=True)
        logits = out.logits[:, -1].float()
        total += torch.nn.functional.cross_entropy(logits, windows[:, i + 1], reduction="sum").item()
        count += windows.shape[0]
    return total, count


def run_perplexity(model: Any, tokenizer: Any, text: str, configs: Sequence[tuple[str, float]], *,
                   prompt_len: int = 512, gen_len: int = 128, windows: int = 4, h2o_options: dict | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Perplexity per (policy, budget) over the same windows; one row per configuration, with the bytes the cache
    held at the end (``kv_bytes``) as a share of an fp16 cache of the same tokens (``byte_share``)."""
    if gen_len < 1:
        raise ValueError(f"gen_len must be >= 1, got {gen_len}")
    batch = text_windows(token_stream(tokenizer, text), windows, prompt_len + gen_len + 1)
    rows = []
    for policy, budget in tqdm(configs, desc="perplexity", disable=not progress):
        start = time.perf_counter()
        cache, reason = make_cache(policy, model, budget, prompt_len, **(h2o_options or {}))
        if cache is None:
            raise ValueError(f"cache {policy!r} cannot run here: {reason}")
        nll, n = streaming_nll(model, batch, prompt_len, cache, progress=progress)
        stored = kv_bytes(cache)
        rows.append({"task": "perplexity", "policy": policy, "budget": budget,
                     "budget_tokens": prompt_len if policy == FULL else budget_tokens(budget, prompt_len),
                     "nll": nll / n, "perplexity": math.exp(nll / n), "tokens": n, "kv_bytes": stored,
                     "byte_share": stored / fp16_kv_bytes(model.config, cache.get_seq_length(), batch.shape[0]),
                     "seconds": round(time.perf_counter() - start, 2)})
        logger.info("perplexity %s@%.2f: %.3f", policy, budget, rows[-1]["perplexity"])
    return rows
