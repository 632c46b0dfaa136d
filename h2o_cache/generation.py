"""``generate`` integration: build an ``H2OCache`` for ``cache_implementation="h2o"`` and refuse what cannot work.

Called by the patched ``GenerationMixin._prepare_cache_for_generation`` (see ``patches/generation.py``).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers.generation.configuration_utils import GenerationMode

from .cache import H2OCache
from .compat import CACHE_ARG
from .config import H2OConfig
from .support import FULL_ATTENTION, OUTPUT_ATTENTIONS_ERROR, SUPPORTED_ATTENTION, check_model_config

H2O_CACHE_IMPLEMENTATION = "h2o"

# Modes that roll the cache back (`crop`) after rejecting tokens: evicted tokens cannot come back.
_ROLLBACK_MODES = {
    GenerationMode.ASSISTED_GENERATION: "assisted/speculative decoding (assistant_model, prompt_lookup_num_tokens)",
    GenerationMode.CONTRASTIVE_SEARCH: "contrastive search",
}


def check_cache_preparation(model: Any, generation_config: Any, uses_patched_preparation: bool) -> None:
    """Refuse ``cache_implementation="h2o"`` for models whose own ``_prepare_cache_for_generation`` ignores it."""
    if generation_config.cache_implementation != H2O_CACHE_IMPLEMENTATION or uses_patched_preparation:
        return
    raise ValueError(
        f"cache_implementation='h2o' is not supported by {type(model).__name__}: it builds its own cache in "
        "_prepare_cache_for_generation (encoder-decoder or multi-cache models such as t5gemma), so an H2OCache "
        "would not be used; H2O supports decoder-only models"
    )


def prepare_h2o_cache(model: Any, generation_config: Any, model_kwargs: dict, generation_mode: Any) -> bool:
    """Validate an H2O generation and, for ``cache_implementation="h2o"``, create its cache.

    Returns True when it created the cache (so transformers' own preparation must be skipped).
    """
    user_cache = model_kwargs.get(CACHE_ARG)
    wants_h2o = generation_config.cache_implementation == H2O_CACHE_IMPLEMENTATION
    if not wants_h2o and not isinstance(user_cache, H2OCache):
        _check_orphan_cache_config(generation_config)
        return False
    if generation_config.output_attentions:
        raise ValueError(OUTPUT_ATTENTIONS_ERROR)
    if not wants_h2o:
        _check_user_cache_layers(user_cache, check_model_config(model.config))
    if wants_h2o and user_cache is not None:
        raise ValueError(
            f"cache_implementation='h2o' builds its own cache: do not also pass {CACHE_ARG} "
            f"(pass an H2OCache as {CACHE_ARG} without cache_implementation instead)"
        )
    if wants_h2o and generation_config.use_cache is False:
        raise ValueError("cache_implementation='h2o' needs use_cache=True")
    if generation_mode in _ROLLBACK_MODES:
        raise ValueError(
            f"H2OCache does not support {_ROLLBACK_MODES[generation_mode]}: it rolls the cache back to undo "
            "rejected tokens, and tokens H2O evicted cannot be restored"
        )
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"H2OCache supports attn_implementation in {list(SUPPORTED_ATTENTION)}, not {attn!r}: it must see "
            "each layer's queries to score the cached tokens"
        )
    from . import patches_enabled

    if not patches_enabled():
        raise RuntimeError("h2o_cache.disable() was called: call h2o_cache.enable() before generating with H2O")
    chunked_prefill = getattr(generation_config, "prefill_chunk_size", None) is not None
    if not wants_h2o:
        if chunked_prefill and user_cache.h2o_config.uses_ratios and user_cache.prompt_length is None:
            raise ValueError(
                "prefill_chunk_size: the prompt reaches the H2OCache in chunks, so its heavy_ratio/recent_ratio "
                "would resolve against the first chunk; create it with H2OCache(..., prompt_length=N) or give "
                "heavy_budget/recent_budget in tokens"
            )
        return False  # transformers' own path marks the user's cache as user-defined
    h2o_config = H2OConfig.from_dict(generation_config.cache_config)
    prompt_length = _prompt_length(generation_config, model_kwargs) if chunked_prefill else None
    model_kwargs[CACHE_ARG] = H2OCache(model.config, h2o_config, prompt_length=prompt_length)
    return True


def _check_user_cache_layers(cache: H2OCache, plan: list) -> None:
    """A user's cache must put its H2O layers where the model has full attention (and windows elsewhere)."""
    if cache.layer_plan == plan or (cache.layer_plan is None and all(t == FULL_ATTENTION for t, _ in plan)):
        return
    if cache.layer_plan is None:
        raise ValueError(
            "this model has sliding-window or chunked layers: create the H2OCache with its config, "
            "H2OCache(model.config, ...), so that those layers keep their own window"
        )
    raise ValueError("this H2OCache was created for a model with other layer types; create one with this "
                     "model's config, H2OCache(model.config, ...)")


def _check_orphan_cache_config(generation_config: Any) -> None:
    """transformers ignores ``cache_config`` without ``cache_implementation``: refuse it when it holds H2O options."""
    options = getattr(generation_config, "cache_config", None)
    if generation_config.cache_implementation is not None or not options:
        return
    h2o_keys = {f.name for f in fields(H2OConfig)}
    if isinstance(options, H2OConfig) or (isinstance(options, dict) and set(options) <= h2o_keys):
        raise ValueError(
            "cache_config holds H2O options but cache_implementation is not set, so it would be ignored: pass "
            "cache_implementation='h2o' as well"
        )


def _prompt_length(generation_config: Any, model_kwargs: dict) -> int | None:
    """The prompt's length, from the 2-D attention mask (transformers >= 5.24 drops an all-ones mask and records
    its length instead)."""
    mask = model_kwargs.get("attention_mask")
    if mask is not None:
        return int(mask.shape[-1])
    return getattr(generation_config, "_mask_length", None)
