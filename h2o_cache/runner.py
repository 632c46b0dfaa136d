"""One timed greedy loop (prefill, then one forward per new token) and the KV bytes of any cache.

``timed_decode`` is the loop every timing in the project goes through: ``h2o-cache generate``/``demo`` (via
``timed_generate``) and the throughput benchmark (``h2o_cache.eval.throughput``). It is the loop ``generate``
runs, written out so that prefill and decode are timed separately; EOS is ignored, so exactly ``new_tokens``
tokens come out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .batching import prefill_in_micro_batches
from .cache import H2OCache
from .compat import cache_kwargs
from .config import H2OConfig


def kv_bytes(cache: Any) -> int:
    """Every byte a transformers cache holds for its tokens: an ``H2OCache`` counts its own (codes, scales, zero
    points, residual, scores, positions, validity); any other cache's layers are walked tensor by tensor, so
    ``QuantizedCache`` counts its packed codes, scales and zero points (quanto's tensors, hqq's metadata) and its
    full-precision residual."""
    if isinstance(cache, H2OCache):
        return cache.kv_bytes()
    return sum(_tensor_bytes(vars(layer)) for layer in getattr(cache, "layers", []))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (nested dicts, lists, tuples; tensor subclasses such as quanto's
    packed tensors through ``__tensor_flatten__``)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def fp16_kv_bytes(config: Any, tokens: int, batch: int = 1) -> int:
    """What an uncompressed cache would hold for ``tokens`` tokens of ``batch`` sequences in fp16, the reference
    of every byte share: 2 bytes x 2 (keys, values) x layers x KV heads x head_dim x tokens x batch."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * 2 * text.num_hidden_layers * kv_heads * head_dim * tokens * batch


@dataclass
class TimedRun:
    """One pass of ``timed_decode``: the new tokens, the cache after the last step, and the timings."""

    new_ids: torch.Tensor
    cache: Any
    prefill_s: float
    decode_s: float
    step_s: list[float]


@torch.inference_mode()
def timed_decode(model: Any, input_ids: torch.Tensor, new_cache: Callable[[], Any], new_tokens: int, *,
                 micro_batch: int = 0, attention_mask: torch.Tensor | None = None) -> TimedRun:
    """Prefill ``input_ids`` into ``new_cache()`` (``micro_batch`` rows at a time when > 0, see
    ``h2o_cache.batching``), then greedily decode exactly ``new_tokens`` tokens, the whole batch at once."""
    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    cache, logits = prefill_in_micro_batches(model, input_ids, new_cache, micro_batch=micro_batch or
                                             input_ids.shape[0], attention_mask=attention_mask)
    nxt = logits.argmax(-1, keepdim=True)
    sync()
    t1 = time.perf_counter()
    out_ids, steps = [nxt], []
    for _ in range(new_tokens - 1):
        s0 = time.perf_counter()
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        out = model(input_ids=nxt, attention_mask=attention_mask, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        out_ids.append(nxt)
        sync()
        steps.append(time.perf_counter() - s0)
    t2 = time.perf_counter()
    return TimedRun(torch.cat(out_ids, 1), cache, t1 - t0, t2 - t1, steps)


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


def timed_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    h2o_config: H2OConfig | None,
    max_new_tokens: int,
    label: str | None = None,
) -> GenerationResult:
    """Greedy generation of exactly ``max_new_tokens`` (EOS ignored) with H2O (``h2o_config``) or the full cache."""
    def new_cache() -> Any:
        return H2OCache(model.config, h2o_config) if h2o_config is not None else DynamicCache(config=model.config)

    run = timed_decode(model, input_ids, new_cache, max_new_tokens, attention_mask=attention_mask)
    batch = input_ids.shape[0]
    steps = max_new_tokens - 1
    return GenerationResult(
        label=label or ("h2o" if h2o_config is not None else "full"),
        sequences=torch.cat([input_ids, run.new_ids], 1),
        prompt_tokens=input_ids.shape[1],
        new_tokens=run.new_ids.shape[1],
        batch_size=batch,
        prefill_s=run.prefill_s,
        decode_tok_s=steps * batch / run.decode_s if steps > 0 else float("nan"),
        total_s=run.prefill_s + run.decode_s,
        kv_bytes=kv_bytes(run.cache),
        tokens_kept=run.cache.tokens_kept() if isinstance(run.cache, H2OCache) else run.cache.get_seq_length(),
        tokens_seen=run.cache.get_seq_length(),
    )
