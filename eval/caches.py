"""The one cache factory of the evaluation layer: a cache name and a budget give a fresh cache.

Names: ``full`` is the uncompressed cache (transformers' ``DynamicCache``); every ``H2OCache`` policy
(``h2o``, ``local``, ``streaming``, ``random``, ...) is ``H2OCache(policy=...)``; ``offloaded`` and ``quantized``
are transformers' own caches (``eval/baselines/transformers_caches``), reported as skipped when they cannot run.

A budget is the total KV budget as a fraction of a length (the prompt's); ``h2o_config`` turns it into tokens
through ``H2OConfig.token_budgets``, half heavy hitters and half recent tokens (each policy re-splits that total
its own way). Budgets of 1 and above (up to 2) keep every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from h2o_cache.config import POLICIES, H2OConfig

FULL = "full"
ALL_POLICIES = (FULL, *POLICIES)
TRANSFORMERS_CACHES = ("offloaded", "quantized")
CACHES = (*ALL_POLICIES, *TRANSFORMERS_CACHES)


def check_policies(policies: Sequence[str]) -> list[str]:
    unknown = [p for p in policies if p not in ALL_POLICIES]
    if unknown or not policies:
        raise ValueError(f"policies: {unknown or 'empty'} not supported; choose from {list(ALL_POLICIES)}")
    return list(dict.fromkeys(policies))


def check_budgets(budgets: Sequence[float]) -> list[float]:
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= 1.0]
    if bad or not budgets:
        raise ValueError(f"budgets: every budget must be a fraction in (0, 1], got {list(budgets)}")
    return sorted(dict.fromkeys(float(b) for b in budgets))


def h2o_config(budget: float, length: int, policy: str = "h2o", **options: Any) -> H2OConfig:
    """``H2OConfig`` holding ``round(budget * length)`` tokens (at least 2): the halves of ``budget`` go through
    ``H2OConfig.token_budgets`` (heavy hitters, recent tokens) and the rounding remainder goes to the recent
    window, so a budget of 1 keeps every one of ``length`` tokens."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 2.0:
        raise ValueError(f"budget must be a fraction of the prompt in (0, 2], got {budget!r}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    heavy, recent = H2OConfig(heavy_ratio=budget / 2, recent_ratio=budget / 2).token_budgets(length)
    recent += max(0, max(2, round(budget * length)) - heavy - recent)
    return H2OConfig(heavy_budget=heavy, recent_budget=recent, policy=policy, **options)


def cache_config(policy: str, budget: float, length: int, **options: Any) -> dict[str, Any]:
    """The same settings as ``generate(cache_implementation="h2o", cache_config=...)`` takes them."""
    config = h2o_config(budget, length, policy, **options)
    return {"heavy_budget": config.heavy_budget, "recent_budget": config.recent_budget, "policy": policy, **options}


def budget_tokens(budget: float, length: int) -> int:
    """Total KV slots (heavy + recent) that ``budget`` gives a prompt of ``length`` tokens."""
    config = h2o_config(budget, length)
    return config.heavy_budget + config.recent_budget


def make_cache(name: str, model: Any, budget: float | None, length: int, **options: Any
               ) -> tuple[Any | None, str | None]:
    """A fresh cache ``name`` for ``model``: ``(cache, None)``, or ``(None, reason)`` when it cannot run here.

    ``budget`` (default 0.2) of ``length`` tokens and ``options`` (``H2OConfig`` fields) apply to the
    ``H2OCache`` policies; transformers' caches take their own options (``quantized``: ``nbits``, ``backend``).
    """
    if name == FULL:
        from transformers import DynamicCache

        return DynamicCache(config=model.config), None
    if name in POLICIES:
        from h2o_cache.cache import H2OCache

        return H2OCache(model.config, h2o_config(0.2 if budget is None else budget, length, name, **options)), None
    if name in TRANSFORMERS_CACHES:
        from .baselines import transformers_caches

        return transformers_caches.make_cache(name, model, **options)
    raise ValueError(f"cache {name!r} is not supported; choose from {list(CACHES)}")


def configurations(policies: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """(policy, budget) pairs: ``full`` once (budget 1.0), every other policy at every budget."""
    out = [(FULL, 1.0)] if FULL in policies else []
    return out + [(p, b) for p in policies if p != FULL for b in budgets]
