"""Pass-key retrieval: a key hidden at several depths of real-text haystacks of several lengths; greedy
``generate(cache_implementation="h2o")``; accuracy = the first number generated is the key."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .caches import FULL, cache_config
from .texts import first_number, passkey_cases, token_stream

logger = logging.getLogger(__name__)


@torch.inference_mode()
def retrieve(model: Any, tokenizer: Any, cases: Sequence[dict[str, Any]], policy: str, budget: float, *,
             max_new_tokens: int = 8, batch_size: int = 8, h2o_options: dict | None = None) -> list[bool]:
    """Greedy-generate an answer for each case with ``cache_implementation="h2o"`` (or the full cache)."""
    hits = []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i : i + batch_size]
        length = len(chunk[0]["input_ids"])
        if any(len(c["input_ids"]) != length for c in chunk):
            raise ValueError("retrieve: a batch must hold prompts of one length (no padding)")
        ids = torch.tensor([c["input_ids"] for c in chunk], device=model.device)
        kwargs: dict[str, Any] = {}
        if policy != FULL:
            kwargs = {"cache_implementation": "h2o",
                      "cache_config": cache_config(policy, budget, length, **(h2o_options or {}))}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
        for case, row in zip(chunk, out[:, length:], strict=True):
            hits.append(first_number(tokenizer.decode(row, skip_special_tokens=True)) == case["key"])
    return hits


def run_retrieval(model: Any, tokenizer: Any, text: str, configs: Sequence[tuple[str, float]], *,
                  lengths: Sequence[int] = (256, 512), depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 2,
                  seed: int = 0, batch_size: int = 8, h2o_options: dict | None = None, progress: bool = True
                  ) -> list[dict[str, Any]]:
    """Pass-key accuracy per (policy, budget), overall and per length/depth cell."""
    cases = passkey_cases(tokenizer, token_stream(tokenizer, text), lengths, depths, samples, seed)
    groups: dict[int, list[dict]] = {}
    for case in cases:
        groups.setdefault(len(case["input_ids"]), []).append(case)
    rows = []
    for policy, budget in tqdm(configs, desc="retrieval", disable=not progress):
        start = time.perf_counter()
        cells: dict[str, list[bool]] = {}
        hits_all: list[bool] = []
        for group in groups.values():
            hits = retrieve(model, tokenizer, group, policy, budget, batch_size=batch_size, h2o_options=h2o_options)
            hits_all += hits
            for case, hit in zip(group, hits, strict=True):
                cells.setdefault(f"len{case['length']}_depth{case['depth']:g}", []).append(hit)
        rows.append({"task": "retrieval", "policy": policy, "budget": budget,
                     "accuracy": sum(hits_all) / len(hits_all), "cases": len(hits_all),
                     "cells": {k: sum(v) / len(v) for k, v in cells.items()},
                     "seconds": round(time.perf_counter() - start, 2)})
        logger.info("retrieval %s@%.2f: %.3f", policy, budget, rows[-1]["accuracy"])
    return rows
