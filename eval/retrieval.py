"""Pass-key retrieval: a key hidden at several depths of real-text haystacks of several lengths; greedy
``generate(cache_implementation="h2o")``; accuracy = the first number generated is the key."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from h2o_cache.runner import fp16_kv_bytes, kv_bytes

from .caches import FULL, TRANSFORMERS_CACHES, cache_config, make_cache
from .texts import first_number, passkey_cases, token_stream

logger = logging.getLogger(__name__)


@torch.inference_mode()
def retrieve(model: Any, tokenizer: Any, cases: Sequence[dict[str, Any]], policy: str, budget: float, *,
             max_new_tokens: int = 8, batch_size: int = 8, h2o_options: dict | None = None,
             kv_usage: dict[str, int] | None = None) -> list[bool]:
    """Greedy-generate an answer for each case with ``cache_implementation="h2o"`` (or the full cache, or one of
    transformers' caches with ``h2o_options`` as its options). ``kv_usage`` (a dict) accumulates the bytes each
    cache held at the end (``kv_bytes``) and an fp16 cache's bytes for the same tokens (``fp16_bytes``)."""
    hits = []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i : i + batch_size]
        length = len(chunk[0]["input_ids"])
        if any(len(c["input_ids"]) != length for c in chunk):
            raise ValueError("retrieve: a batch must hold prompts of one length (no padding)")
        ids = torch.tensor([c["input_ids"] for c in chunk], device=model.device)
        kwargs: dict[str, Any] = {}
        if policy in TRANSFORMERS_CACHES:
            cache, reason = make_cache(policy, model, budget, length, **(h2o_options or {}))
            if cache is None:
                raise ValueError(f"cache {policy!r} cannot run here: {reason}")
            kwargs = {"past_key_values": cache}
        elif policy != FULL:
            kwargs = {"cache_implementation": "h2o",
                      "cache_config": cache_config(policy, budget, length, **(h2o_options or {}))}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                             **kwargs)
        if kv_usage is not None:
            cache = out.past_key_values
            kv_usage["kv_bytes"] = kv_usage.get("kv_bytes", 0) + kv_bytes(cache)
            kv_usage["fp16_bytes"] = (kv_usage.get("fp16_bytes", 0)
                                      + fp16_kv_bytes(model.config, cache.get_seq_length(), len(chunk)))
        for case, row in zip(chunk, out.sequences[:, length:], strict=True):
            hits.append(first_number(tokenizer.decode(row, skip_special_tokens=True)) == case["key"])
    return hits


def run_retrieval(model: Any, tokenizer: Any, text: str, configs: Sequence[tuple[str, float]], *,
                  lengths: Sequence[int] = (256, 512), depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 2,
                  seed: int = 0, batch_size: int = 8, h2o_options: dict | None = None, progress: bool = True
                  ) -> list[dict[str, Any]]:
    """Pass-key accuracy per (policy, budget), overall and per length/depth cell; ``kv_bytes`` is the sum over
    the prompts' caches at the end of generation, ``byte_share`` its ratio to fp16 caches of the same tokens."""
    cases = passkey_cases(tokenizer, token_stream(tokenizer, text), lengths, depths, samples, seed)
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(len(case["input_ids"]), []).append(case)
    rows = []
    for policy, budget in tqdm(configs, desc="retrieval", disable=not progress):
        start = time.perf_counter()
        cells: dict[str, list[bool]] = {}
        hits_all: list[bool] = []
        usage: dict[str, int] = {}
        for group in groups.values():
            hits = retrieve(model, tokenizer, group, policy, budget, batch_size=batch_size, h2o_options=h2o_options,
                            kv_usage=usage)
            hits_all += hits
            for case, hit in zip(group, hits, strict=True):
                cells.setdefault(f"len{case['length']}_depth{case['depth']:g}", []).append(hit)
        rows.append({"task": "retrieval", "policy": policy, "budget": budget,
                     "accuracy": sum(hits_all) / len(hits_all), "cases": len(hits_all),
                     "kv_bytes": usage["kv_bytes"], "byte_share": usage["kv_bytes"] / usage["fp16_bytes"],
                     "cells": {k: sum(v) / len(v) for k, v in cells.items()},
                     "seconds": round(time.perf_counter() - start, 2)})
        logger.info("retrieval %s@%.2f: %.3f", policy, budget, rows[-1]["accuracy"])
    return rows
