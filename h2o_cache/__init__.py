"""h2o-cache: Heavy-Hitter Oracle KV-cache eviction (and hot/cold FFN offload) for Hugging Face transformers.

Importing the package applies the patches in ``h2o_cache.patches`` (idempotent): ``cache_implementation="h2o"``
becomes a valid ``generate`` option and the attention functions route H2O layers through the scoring attention.
``disable()`` reverts them; ``enable()`` applies them again.
"""

from __future__ import annotations

from .batching import concatenate_caches, prefill_in_micro_batches
from .cache import H2OCache, H2OLayer
from .config import POLICIES, H2OConfig
from .models import load_model

__version__ = "0.1.0"
__all__ = [
    "H2OCache", "H2OConfig", "H2OLayer", "POLICIES", "concatenate_caches", "disable", "enable", "load_model",
    "patches_enabled", "prefill_in_micro_batches",
]


def enable() -> None:
    """Apply the transformers patches (done on import)."""
    from . import patches

    patches.apply()


def disable() -> None:
    """Revert the transformers patches: transformers behaves as if h2o_cache was never imported.

    ``generate(cache_implementation="h2o")`` then fails with transformers' own "Invalid `cache_implementation`"
    error, and an ``H2OCache`` is refused; call ``h2o_cache.enable()`` to use H2O again.
    """
    from . import patches

    patches.revert()


def patches_enabled() -> bool:
    from . import patches

    return patches.is_applied()


enable()
