"""Refuse H2O on transformers' continuous-batching path instead of letting it drop the request silently.

``generate_batch``, ``init_continuous_batching`` (used by ``transformers serve --continuous-batching`` and
``continuous_batching_context_manager``) and ``generate(cache_implementation="paged")`` (which calls
``generate_batch``) always build their own ``PagedAttentionCache``: a ``cache_implementation="h2o"`` generation
config or an ``H2OCache`` passed in would be ignored without a word and the full cache used. The wrappers raise
a ``ValueError`` for exactly those requests and call the originals unchanged otherwise. docs/SCALE_OUT.md
explains what an H2O paged cache would need.
"""

from __future__ import annotations

import functools
from typing import Any

from h2o_cache.cache import H2OCache
from h2o_cache.generation import H2O_CACHE_IMPLEMENTATION

try:  # transformers versions without continuous batching have nothing to guard
    from transformers.generation.continuous_batching import ContinuousMixin
except ImportError:  # pragma: no cover - depends on the installed transformers
    ContinuousMixin = None

_GUARDED = ("init_continuous_batching", "generate_batch")
_originals: dict[str, Any] = {}


def _refuse_h2o(entry: str, model: Any, generation_config: Any, kwargs: dict) -> None:
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    asked = []
    if getattr(config, "cache_implementation", None) == H2O_CACHE_IMPLEMENTATION:
        asked.append(f'generation_config.cache_implementation="{H2O_CACHE_IMPLEMENTATION}"')
    asked += [f"{name}=H2OCache" for name, value in kwargs.items() if isinstance(value, H2OCache)]
    if asked:
        raise ValueError(
            f"{entry}: continuous batching (generate_batch, init_continuous_batching, "
            f'cache_implementation="paged", transformers serve --continuous-batching) builds its own paged '
            f"full-size KV cache and would ignore {', '.join(asked)}. Use model.generate(..., "
            f'cache_implementation="h2o") (batched with left padding) or `h2o-cache serve` instead; '
            "docs/SCALE_OUT.md explains what H2O under continuous batching would need."
        )


def _wrap(name: str, original: Any) -> Any:
    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        generation_config = args[1] if name == "generate_batch" and len(args) > 1 else (
            args[0] if name == "init_continuous_batching" and args else kwargs.get("generation_config"))
        _refuse_h2o(name, self, generation_config, kwargs)
        return original(self, *args, **kwargs)

    guarded._h2o_wrapped = True
    return guarded


def apply() -> None:
    if ContinuousMixin is None or _originals:
        return
    for name in _GUARDED:
        original = ContinuousMixin.__dict__.get(name)
        if original is not None:
            _originals[name] = original
            setattr(ContinuousMixin, name, _wrap(name, original))


def revert() -> None:
    for name, original in _originals.items():
        setattr(ContinuousMixin, name, original)
    _originals.clear()


def is_applied() -> bool:
    return bool(_originals)
