"""One timed generation with a chosen cache: what the CLI, the demo and the examples report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from .cache import H2OCache
from .compat import cache_kwargs
from .config import H2OConfig


class _StepClock(LogitsProcessor):
    """Timestamps each generation step: the first call comes right after the prefill forward."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class GenerationResult:
    label: str
    sequences: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    prefill_s: float
    decode_tok_s: float
    total_s: float
    kv_bytes: int
    tokens_kept: int
    tokens_seen: int

    def as_row(self) -> dict[str, Any]:
        return {
            "cache": self.label,
            "prefill s": round(self.prefill_s, 3),
            "decode tok/s": round(self.decode_tok_s, 2),
            "KV MiB": round(self.kv_bytes / 2**20, 2),
            "tokens kept": self.tokens_kept,
            "tokens seen": self.tokens_seen,
        }


def kv_bytes_of(cache: Any) -> int:
    """Stored key/value bytes of any transformers cache."""
    if isinstance(cache, H2OCache):
        return cache.kv_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def timed_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    h2o: H2OConfig | None,
    max_new_tokens: int,
    label: str | None = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Greedy generation of exactly ``max_new_tokens`` (EOS ignored) with H2O (``h2o``) or the full cache."""
    cache = H2OCache(model.config, h2o) if h2o is not None else DynamicCache()
    clock = _StepClock()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generate_kwargs.setdefault("do_sample", False)
    start = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(
            input_ids,
            attention_mask=attention_mask,
            **cache_kwargs(cache),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=model.generation_config.pad_token_id or model.config.eos_token_id,
            **generate_kwargs,
        )
    end = time.perf_counter()
    prefill = clock.stamps[0] - start
    steps = len(clock.stamps) - 1
    decode_rate = steps * input_ids.shape[0] / (clock.stamps[-1] - clock.stamps[0]) if steps > 0 else float("nan")
    return GenerationResult(
        label=label or ("h2o" if h2o is not None else "full"),
        sequences=sequences,
        prompt_tokens=input_ids.shape[1],
        new_tokens=sequences.shape[1] - input_ids.shape[1],
        batch_size=input_ids.shape[0],
        prefill_s=prefill,
        decode_tok_s=decode_rate,
        total_s=end - start,
        kv_bytes=kv_bytes_of(cache),
        tokens_kept=cache.tokens_kept() if isinstance(cache, H2OCache) else cache.get_seq_length(),
        tokens_seen=cache.get_seq_length(),
    )
