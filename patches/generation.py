"""Teach ``generate`` the ``cache_implementation="h2o"`` string.

- ``"h2o"`` joins ``ALL_CACHE_IMPLEMENTATIONS`` (read at each ``GenerationConfig.validate``), so generation
  configs using it validate, save and load once ``h2o_cache`` is imported.
- ``GenerationMixin._prepare_cache_for_generation`` builds an ``H2OCache`` from ``cache_config`` for ``"h2o"``
  and checks user-supplied ``H2OCache`` objects against the generation mode; all logic lives in
  ``h2o_cache.generation``.
- A few models override ``_prepare_cache_for_generation`` (t5gemma, parakeet, ...), so the patch above never
  runs for them and ``"h2o"`` would silently give a ``DynamicCache``. ``_validate_generation_mode``, which
  ``generate`` calls before preparing the cache and no model overrides, refuses ``"h2o"`` for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from transformers.generation import configuration_utils
from transformers.generation.utils import GenerationMixin

from h2o_cache.generation import H2O_CACHE_IMPLEMENTATION, check_cache_preparation, prepare_h2o_cache

_original_prepare = None
_original_validate_mode = None
_original_implementations: tuple[str, ...] | None = None
_wrappers: dict[str, Callable] = {}  # name -> this patch's wrapper, for revert()


def apply() -> None:
    global _original_prepare, _original_validate_mode, _original_implementations
    if _original_prepare is not None:
        return
    _original_implementations = configuration_utils.ALL_CACHE_IMPLEMENTATIONS
    configuration_utils.ALL_CACHE_IMPLEMENTATIONS = _original_implementations + (H2O_CACHE_IMPLEMENTATION,)
    _original_prepare = GenerationMixin._prepare_cache_for_generation
    _original_validate_mode = GenerationMixin._validate_generation_mode

    original_prepare, original_validate = _original_prepare, _original_validate_mode
    # Each wrapper keeps its own original and an `_h2o_active` flag: if another library wrapped the method after
    # this patch, revert() cannot take the patch out of the chain without dropping that library's wrapper, so it
    # leaves the patch in place, inert.
    @functools.wraps(original_prepare)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        if _prepare_cache_for_generation._h2o_active and prepare_h2o_cache(
            self, generation_config, model_kwargs, generation_mode
        ):
            return None
        return original_prepare(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)

    @functools.wraps(original_validate)
    def _validate_generation_mode(self, generation_mode, generation_config, *args, **kwargs):
        if _validate_generation_mode._h2o_active:
            check_cache_preparation(self, generation_config, _runs_patched_preparation(type(self)))
        return original_validate(self, generation_mode, generation_config, *args, **kwargs)

    for wrapper in (_prepare_cache_for_generation, _validate_generation_mode):
        wrapper._h2o_patched = wrapper._h2o_active = True
        _wrappers[wrapper.__name__] = wrapper
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
    GenerationMixin._validate_generation_mode = _validate_generation_mode


def _runs_patched_preparation(cls: type) -> bool:
    """Whether ``cls._prepare_cache_for_generation`` reaches this patch.

    Not an identity test: another library may wrap the method after ``import h2o_cache``. It does reach the patch
    when no model class overrides GenerationMixin's method, or when the wrappers chain (``__wrapped__``) to it.
    """
    owner = next((c for c in cls.__mro__ if "_prepare_cache_for_generation" in vars(c)), None)
    if owner is GenerationMixin:
        return True
    fn = cls._prepare_cache_for_generation
    for _ in range(32):  # a chain of wrappers is short; a cycle must not hang generate
        if getattr(fn, "_h2o_active", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def revert() -> None:
    global _original_prepare, _original_validate_mode, _original_implementations
    if _original_prepare is None:
        return
    for name, original in (("_prepare_cache_for_generation", _original_prepare),
                           ("_validate_generation_mode", _original_validate_mode)):
        # Identity, not the marker: functools.wraps copies the marker onto a wrapper of this wrapper.
        if GenerationMixin.__dict__[name] is _wrappers[name]:
            setattr(GenerationMixin, name, original)
        else:  # wrapped by someone else since: keep their wrapper, make ours inert
            _wrappers[name]._h2o_active = False
    _wrappers.clear()
    configuration_utils.ALL_CACHE_IMPLEMENTATIONS = _original_implementations
    _original_prepare = _original_validate_mode = _original_implementations = None
