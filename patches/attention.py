"""Route transformers' attention functions through H2O for layers of an ``H2OCache``.

Each wrapped entry of the attention registry checks whether its module's layer is pending in an ``H2OCache``
(``h2o_cache.cache.claim_pending``); if so the call goes to ``h2o_cache.attention.h2o_attention``, otherwise to
the original function, unchanged. ``eager`` is not a registry entry in transformers (each model file has its own
``eager_attention_forward``); the wrapper registered under that name falls back to the calling model's own
function, which every modeling file of transformers 5 defines under that name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from transformers.modeling_utils import AttentionInterface

from h2o_cache.attention import h2o_attention
from h2o_cache.cache import claim_pending
from h2o_cache.support import SUPPORTED_ATTENTION

_originals: dict[str, Callable | None] = {}


def _model_eager(module) -> Callable:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: its modeling file defines no eager_attention_forward")
    return fn


def _wrap(name: str, original: Callable | None) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        backend = original if original is not None else _model_eager(module)
        layer = claim_pending(getattr(module, "layer_idx", None), key)
        if layer is None:
            return backend(module, query, key, value, attention_mask, **kwargs)
        return h2o_attention(layer, name, backend, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"h2o_{name}_attention"
    attention._h2o_wrapped = True
    return attention


def apply() -> None:
    mapping = AttentionInterface._global_mapping
    for name in SUPPORTED_ATTENTION:
        if name in _originals:
            continue
        original = mapping.get(name)
        if getattr(original, "_h2o_wrapped", False):
            continue
        if original is None and name != "eager":
            continue  # a flash version this transformers does not know
        _originals[name] = original
        mapping[name] = _wrap(name, original)


def revert() -> None:
    mapping = AttentionInterface._global_mapping
    for name, original in _originals.items():
        if original is None:
            mapping.pop(name, None)
        else:
            mapping[name] = original
    _originals.clear()


def is_applied() -> bool:
    return bool(_originals)
