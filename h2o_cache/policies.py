"""Eviction policies: how a layer's bookkeeping becomes "which older tokens to keep".

Every policy runs on the same machinery (``H2OLayer``): the most recent tokens are always kept, and the remaining
slots go to the older tokens with the highest *priority*. A policy only says how the total budget splits into
recent and "heavy" slots and how priority is computed, so comparisons between policies at equal budget are fair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import H2OConfig

# The recent window of ``keep_all``: more tokens than any sequence holds, so the layer never reaches its budget.
KEEP_ALL = 2**62


@dataclass(frozen=True)
class Policy:
    name: str
    needs_scores: bool

    def split(self, heavy: int, recent: int, config: H2OConfig) -> tuple[int, int]:
        """``(heavy slots, recent slots)`` from the configured budgets; the total never changes."""
        return heavy, recent

    def priority(
        self, scores: torch.Tensor | None, positions: torch.Tensor, seen: int, config: H2OConfig
    ) -> torch.Tensor:
        """Float priority per stored token, shape ``[B, H, S]``; higher is kept."""
        raise NotImplementedError


class HeavyHitters(Policy):
    def priority(self, scores, positions, seen, config):
        if config.score_normalization == "age":
            # Number of queries (including the token itself) that have attended to each token.
            return scores / (seen - positions).clamp_min(1).to(scores.dtype)
        return scores


class HeavyOnly(HeavyHitters):
    def split(self, heavy, recent, config):
        return heavy + recent, 0


class KeepAll(Policy):
    """No eviction: the whole budget is one unbounded recent window (``keep_all``; the budget options do not apply)."""

    def split(self, heavy, recent, config):
        return 0, KEEP_ALL

    def priority(self, scores, positions, seen, config):
        return positions.float()


class Local(Policy):
    def split(self, heavy, recent, config):
        return 0, heavy + recent

    def priority(self, scores, positions, seen, config):
        return positions.float()


class Streaming(Policy):
    def split(self, heavy, recent, config):
        total = heavy + recent
        sinks = min(config.sink_tokens, total - 1)
        return sinks, total - sinks

    def priority(self, scores, positions, seen, config):
        # The oldest (valid) tokens are the attention sinks.
        return -positions.float()


class RandomOlder(Policy):
    def priority(self, scores, positions, seen, config):
        # A fixed pseudo-random key per (sequence, head, position): a token's fate does not flip between steps,
        # and no per-token state has to be stored or reordered.
        b = torch.arange(positions.shape[0], device=positions.device).view(-1, 1, 1)
        h = torch.arange(positions.shape[1], device=positions.device).view(1, -1, 1)
        x = (positions.long() * 2654435761 + b * 40503 + h * 9973 + config.seed * 362437) % 2147483647
        return torch.frac(torch.sin(x.double()) * 43758.5453).float()


_POLICIES: dict[str, Policy] = {
    "h2o": HeavyHitters("h2o", needs_scores=True),
    "h2o_no_recent": HeavyOnly("h2o_no_recent", needs_scores=True),
    "local": Local("local", needs_scores=False),
    "streaming": Streaming("streaming", needs_scores=False),
    "random": RandomOlder("random", needs_scores=False),
    "keep_all": KeepAll("keep_all", needs_scores=False),
}


def get_policy(name: str) -> Policy:
    if name not in _POLICIES:
        raise ValueError(f"policy={name!r} is not supported; choose one of {sorted(_POLICIES)}")
    return _POLICIES[name]
