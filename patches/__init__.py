"""The explicit, idempotent, reversible patches that teach transformers about H2O.

Only adaptation lives here; the logic is in ``h2o_cache``. ``import h2o_cache`` applies them;
``h2o_cache.disable()`` reverts them and ``h2o_cache.enable()`` applies them again.
"""

from __future__ import annotations

from . import attention, continuous_batching, generation


def apply() -> None:
    attention.apply()
    generation.apply()
    continuous_batching.apply()


def revert() -> None:
    continuous_batching.revert()
    generation.revert()
    attention.revert()


def is_applied() -> bool:
    return attention.is_applied()
