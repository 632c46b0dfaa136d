"""Names that changed inside transformers 5.x, resolved once for the installed version.

transformers 5.24 renamed the cache argument of ``forward``/``generate`` (and the cache field of model outputs)
from ``past_key_values`` to ``cache``; the old name still works there, with a deprecation warning. The library
passes and reads caches under the installed version's own name, so neither name is hard-coded elsewhere.
"""

from __future__ import annotations

from typing import Any

from transformers.generation import utils as _generation_utils

CACHE_ARG: str = "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a model forward or ``generate`` call."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model forward or ``generate(return_dict_in_generate=True)`` returned."""
    return getattr(output, CACHE_ARG)
