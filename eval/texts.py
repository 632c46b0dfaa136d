"""Evaluation text and what is cut from it: token windows, fixed-length prompt batches and pass-key prompts.

The text is the Python reference (``pydoc_data.topics``) unless a file is given; reading files is
``h2o_cache.offload.profiler.read_texts``'s job (one reader for the whole project).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PASSKEY_NEEDLE = "\nThe secret pass key is {key}. Remember: the pass key is {key}.\n"
PASSKEY_QUESTION = "\n\nQuestion: What is the secret pass key?\nAnswer: The secret pass key is"


def load_text(path: str | Path | None = None) -> str:
    """The evaluation text: a .txt file, a JSONL file (its ``text`` fields joined), or the reference text."""
    from h2o_cache.offload.profiler import read_texts

    try:
        return "\n\n".join(read_texts(path))
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None


def token_stream(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_windows(tokens: Sequence[int], n_windows: int, length: int) -> torch.Tensor:
    """``n_windows`` windows of ``length`` tokens evenly spaced over the stream (deterministic, no picking)."""
    if n_windows < 1:
        raise ValueError(f"windows must be >= 1, got {n_windows}")
    if len(tokens) < length:
        raise ValueError(f"the text has {len(tokens)} tokens; a window needs {length} (prompt_len + gen_len + 1)")
    span = len(tokens) - length
    starts = [round(i * span / max(1, n_windows - 1)) if n_windows > 1 else 0 for i in range(n_windows)]
    return torch.tensor([tokens[s : s + length] for s in starts], dtype=torch.long)


def prompt_batch(tokenizer: Any, vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """``[batch, prompt_len]`` token ids, no padding: consecutive stretches of the reference text when a
    tokenizer is given, seeded random ids otherwise."""
    if tokenizer is not None:
        from h2o_cache.models import reference_text

        ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
        need = prompt_len * batch
        if ids.numel() < need:
            ids = ids.repeat(need // ids.numel() + 1)
        return ids[:need].view(batch, prompt_len).clone()
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=gen)


def passkey_text(haystack: str, key: str, cut: int) -> str:
    """A pass-key prompt as text: ``key`` hidden at character ``cut`` of ``haystack``, then the question."""
    return haystack[:cut] + PASSKEY_NEEDLE.format(key=key) + haystack[cut:] + PASSKEY_QUESTION


def passkey_cases(tokenizer: Any, tokens: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
                  samples: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Prompts of exactly ``length`` tokens: real-text haystack, a 5-digit key at ``depth``, then the question.

    Each (length, depth, sample) takes its haystack from a different, seeded place of the text.
    """
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must be in [0, 1], got {bad}")
    rng = random.Random(seed)
    question = token_stream(tokenizer, PASSKEY_QUESTION)
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randint(10000, 99999))
                needle = token_stream(tokenizer, PASSKEY_NEEDLE.format(key=key))
                hay_len = length - len(needle) - len(question)
                if hay_len < 1:
                    raise ValueError(f"lengths: {length} tokens is too short for the needle and question")
                start = rng.randrange(0, len(tokens) - hay_len)
                hay = list(tokens[start : start + hay_len])
                at = round(depth * hay_len)
                ids = hay[:at] + needle + hay[at:] + question
                cases.append({"length": length, "depth": depth, "key": key, "input_ids": ids})
    return cases


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None
