"""What H2O can serve: checks on a model's config and attention call, with errors that say why not."""

from __future__ import annotations

from typing import Any

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
FULL_ATTENTION = "full_attention"
# Layer types whose memory transformers already bounds by a window (the config field that holds it): H2OCache
# keeps transformers' own layer for them and compresses only the full-attention layers.
WINDOW_TYPES = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


# Columns of an H2O step's attention are cache slots, which hold different positions per KV head and change at
# every eviction: returned as if they were positions (as DynamicCache's are), they would be silently misread.
OUTPUT_ATTENTIONS_ERROR = (
    "output_attentions=True is not supported with H2OCache: its attention runs over the kept slots, which hold "
    "different token positions per head, so the weights would not line up with positions; run the same input "
    "with a DynamicCache (or no cache) to inspect attention"
)


def check_model_config(config: Any) -> list[tuple[str, int | None]]:
    """Raise ``ValueError`` if H2O cannot serve this model; return its cache plan, one entry per decoder layer:
    ``(layer type, window)``, the type ``"full_attention"`` (an H2O layer, window ``None``) or one of
    ``WINDOW_TYPES`` (transformers' sliding-window layer of that window).

    Without ``config.layer_types`` the types are inferred as transformers does: every layer slides when the
    config has a ``sliding_window`` (Mistral), is chunked with an ``attention_chunk_size``, else is full.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"H2OCache does not support encoder-decoder models ({type(config).__name__}): only the decoder "
            "self-attention of decoder-only models is compressed"
        )
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
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
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
        inferred = ("sliding_attention" if sliding
                    else "chunked_attention" if getattr(text, "attention_chunk_size", None) is not None
                    else FULL_ATTENTION)
        layer_types = [inferred] * num_layers
    other = sorted(set(layer_types) - {FULL_ATTENTION, *WINDOW_TYPES})
    if other:
        raise ValueError(
            f"H2OCache compresses full-attention layers and keeps sliding-window and chunked layers as "
            f"transformers' window; {type(config).__name__} also has layer types {other} (linear-attention, "
            "recurrent or shared layers), whose state H2O does not manage"
        )
    plan: list[tuple[str, int | None]] = []
    for layer_type in layer_types:
        window = None
        if layer_type in WINDOW_TYPES:
            window = getattr(text, WINDOW_TYPES[layer_type], None)
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"H2OCache: {type(config).__name__} has {layer_type} layers but "
                                 f"{WINDOW_TYPES[layer_type]}={window!r} (expected an integer >= 1)")
        plan.append((layer_type, window))
    return plan


def check_attention_call(module: Any, kwargs: dict[str, Any]) -> None:
    """Refuse attention features the scoring path does not reproduce."""
    if kwargs.get("output_attentions"):
        raise ValueError(OUTPUT_ATTENTIONS_ERROR)
    # Logit softcapping (`softcap`, Gemma 2) and per-head attention sinks (`s_aux`, GPT-OSS) are reproduced by the
    # scoring attention; other score modifiers are not.
    for name in ("sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"H2O scoring attention does not support `{name}` (used by {type(module).__name__})")
    if kwargs.get("sliding_window") is not None:
        # H2OCache(model.config) gives sliding layers transformers' own window layer, so only a cache built
        # without the config (or a model whose layer_types disagree with its attention) gets here.
        raise ValueError(
            f"H2O layer {getattr(module, 'layer_idx', '?')} received sliding-window attention "
            f"({type(module).__name__}, sliding_window={kwargs['sliding_window']}): create the cache with the "
            "model's config, H2OCache(model.config, ...), so that sliding layers keep their own window"
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
