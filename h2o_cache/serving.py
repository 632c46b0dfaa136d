"""An OpenAI-compatible server with H2O: transformers' own ``transformers serve``, started in a process that has
imported ``h2o_cache``.

``transformers serve`` (extra ``transformers[serving]``: fastapi, uvicorn, openai) answers
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses`` and builds one ``GenerationConfig`` per request:
the model's default, or the request's ``generation_config`` field (a JSON string) instead of it. This module
adds three things and nothing else:

- the model's default generation config gets ``cache_implementation="h2o"`` and the server's ``cache_config``,
  so every request compresses unless it sends its own ``generation_config``;
- a request's ``generation_config`` may name ``cache_implementation="h2o"`` and its own ``cache_config``, or
  ``cache_implementation="dynamic"`` for the full cache (``generate`` fills the fields a request leaves unset
  from the model's default, so leaving ``cache_implementation`` out keeps the server's H2O);
- a bad generation config (unknown H2O option, invalid value) is answered with HTTP 400 naming the problem,
  instead of failing inside the generation thread.

Continuous batching (``--continuous-batching`` of ``transformers serve``) is not offered: its paged cache has no
H2O (see docs/SCALE_OUT.md), and ``h2o_cache`` refuses H2O there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import H2OConfig
from .generation import H2O_CACHE_IMPLEMENTATION

logger = logging.getLogger(__name__)

_HANDLERS = ("_chat_handler", "_completion_handler", "_response_handler")


def check_request_config(generation_config: Any) -> None:
    """Raise ``ValueError`` if a request's generation config asks for H2O with options H2O does not accept."""
    if getattr(generation_config, "cache_implementation", None) == H2O_CACHE_IMPLEMENTATION:
        H2OConfig.from_dict(generation_config.cache_config)


def _validating(build):
    """Wrap a handler's ``_build_generation_config`` so a bad request config becomes an HTTP 400."""
    from fastapi import HTTPException

    def build_generation_config(body: dict, model_generation_config: Any, use_cb: bool = False):
        try:
            config = build(body, model_generation_config, use_cb=use_cb)
            check_request_config(config)
        except (ValueError, TypeError) as err:
            raise HTTPException(status_code=400, detail=f"generation_config: {err}") from err
        return config

    return build_generation_config


@contextlib.contextmanager
def _models_load_with_h2o_default(h2o: H2OConfig | None) -> Iterator[None]:
    """While the server starts (it preloads the one model it serves), give that model an H2O default."""
    from transformers.cli.serving import model_manager

    original = model_manager.ModelManager

    class H2OModelManager(original):
        def _load_model(self, *args, **kwargs):
            model = super()._load_model(*args, **kwargs)
            if h2o is not None:
                config = copy.deepcopy(model.generation_config)
                config.cache_implementation = H2O_CACHE_IMPLEMENTATION
                config.cache_config = h2o.to_dict()
                model.generation_config = config
            return model

    model_manager.ModelManager = H2OModelManager
    try:
        yield
    finally:
        model_manager.ModelManager = original


def default_model_folder() -> Path:
    """The embedded SmolLM2 as a saved folder (converted from its GGUF once, as ``load_model()`` does)."""
    from .models import EMBEDDED_NAME, cache_home, load_model

    folder = cache_home() / EMBEDDED_NAME
    if not (folder / "config.json").exists():
        load_model()
    return folder


def start_server(
    model: str | Path | None = None,
    *,
    h2o: H2OConfig | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    log_level: str = "warning",
):
    """Start ``transformers serve`` for one model in a background thread; returns the ``Serve`` object.

    ``h2o=None`` serves the full cache by default (requests may still ask for H2O). Stop it with
    ``server.kill_server()``.
    """
    from transformers.cli.serve import Serve

    folder = Path(model) if model is not None else default_model_folder()
    if not (folder / "config.json").exists():
        raise ValueError(f"model={str(model)!r}: expected a saved transformers model folder (with config.json)")
    with _models_load_with_h2o_default(h2o):
        server = Serve(force_model=str(folder), device=device, dtype=dtype, attn_implementation=attn_implementation,
                       host=host, port=port, log_level=log_level, non_blocking=True)
    for name in _HANDLERS:
        handler = getattr(server, name, None)
        if handler is not None:
            handler._build_generation_config = _validating(handler._build_generation_config)
    return server


def serve(model: str | Path | None, h2o: H2OConfig | None, **options: Any) -> None:
    """Run the server until interrupted (the ``h2o-cache serve`` command)."""
    server = start_server(model, h2o=h2o, **options)
    default = "full cache" if h2o is None else f"H2O {json.dumps(h2o.to_dict())}"
    logger.warning("serving on http://%s:%s/v1 (default: %s)", options.get("host", "127.0.0.1"),
                   options.get("port", 8000), default)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.kill_server()
