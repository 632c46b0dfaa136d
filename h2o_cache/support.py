"""What H2O can serve: checks on a model's config and attention call, with errors that say why not."""

from __future__ import annotations

from typing import Any

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_SLIDING_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding", "reference_sliding_attention")


# Columns of an H2O step's attention are cache slots, which hold different positions per KV head and change at
# every eviction: returned as if they were positions (as DynamicCache's are), they would be silently misread.
OUTPUT_ATTENTIONS_ERROR = (
    "output_attentions=True is not supported with H2OCache: its attention runs over the kept slots, which hold "
    "different token positions per head, so the weights would not line up with positions; run the same input "
    "with a DynamicCache (or no cache) to inspect attention"
)


def check_model_config(config: Any) -> int:
    """Raise ``ValueError`` if H2O cannot serve this model; return its number of decoder layers."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"H2OCache does not support encoder-decoder models ({type(config).__name__}): only the decoder "
            "self-attention of decoder-only models is compressed"
        )
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(
                f"H2OCache supports only full-attention layers; {type(config).__name__} has layer types {other}. "
                "Sliding-window, chunked, linear-attention and hybrid layers already bound their own cache and "
                "would need per-layer policies that H2O does not implement"
            )
    elif getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        raise ValueError(
            f"H2OCache does not combine with sliding-window attention (sliding_window={text.sliding_window} in "
            f"{type(config).__name__}); set config.sliding_window = None to use H2O instead of the window"
        )
    if getattr(text, "kv_sharing_modes", None) is not None or getattr(text, "num_kv_shared_layers", 0):
        raise ValueError(f"H2OCache does not support cross-layer KV sharing ({type(config).__name__})")
    if not _uses_attention_registry(getattr(text, "model_type", None)):
        raise ValueError(
            f"H2OCache does not support {text.model_type!r} models: their attention is computed inside the "
            "modeling file instead of through transformers' attention functions, so H2O cannot see the queries "
            "to score the cached tokens (e.g. bloom, falcon, gpt_neo, mpt, xglm)"
        )
    num_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"H2OCache: cannot read num_hidden_layers from {type(config).__name__}")
    return num_layers


def check_attention_call(module: Any, kwargs: dict[str, Any]) -> None:
    """Refuse attention features the scoring path does not reproduce."""
    if kwargs.get("output_attentions"):
        raise ValueError(OUTPUT_ATTENTIONS_ERROR)
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"H2O scoring attention does not support `{name}` (used by {type(module).__name__})")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"H2O does not combine with sliding-window attention ({type(module).__name__}, "
            f"sliding_window={kwargs['sliding_window']})"
        )
    if getattr(module, "training", False):
        raise ValueError("H2OCache is for inference: call model.eval() (dropout in attention is not supported)")


def _uses_attention_registry(model_type: str | None) -> bool:
    """Whether the family's modeling file dispatches attention through transformers' registry (which
    ``h2o_cache.patches`` wraps); True when that cannot be told (an unknown or remote-code family)."""
    if not model_type:
        return True
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    try:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return True
    return hasattr(module, "ALL_ATTENTION_FUNCTIONS")
