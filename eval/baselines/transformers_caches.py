"""Baseline caches from transformers itself: ``DynamicCache`` (the full cache), the ``"offloaded"`` cache and
the ``"quantized"`` cache (needs a quantization backend: optimum-quanto or hqq).

Each factory returns ``(cache, None)`` or ``(None, reason)`` so a missing backend is reported as skipped, never faked.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

QUANT_BACKENDS = ("quanto", "hqq")


def backend_missing(backend: str) -> str | None:
    """Why ``backend`` (``quanto`` or ``hqq``) cannot serve a ``QuantizedCache`` here, or None when it is installed."""
    if backend == "quanto":
        found = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto")
        return None if found else "optimum-quanto not installed (pip install optimum-quanto)"
    if backend == "hqq":
        return None if importlib.util.find_spec("hqq") is not None else "hqq not installed (pip install hqq)"
    raise ValueError(f"backend {backend!r} is not supported; choose from {list(QUANT_BACKENDS)}")


def quantized_backend() -> tuple[str | None, str | None]:
    """The first usable quantized-cache backend, or ``(None, reason)``."""
    reasons = [backend_missing(b) for b in QUANT_BACKENDS]
    for backend, reason in zip(QUANT_BACKENDS, reasons, strict=True):
        if reason is None:
            return backend, None
    return None, "; ".join(reasons)


def make_cache(kind: str, model: Any, *, nbits: int = 4, backend: str | None = None, **quant_options: Any
               ) -> tuple[Any | None, str | None]:
    """A fresh cache of ``kind`` (``offloaded`` or ``quantized``) for ``model``; ``full`` (``DynamicCache``) is
    built by ``h2o_cache.eval.caches.make_cache``. ``quantized`` takes ``nbits`` and a ``backend`` (default: the
    first installed of ``QUANT_BACKENDS``) and ``QuantizedCache``'s own options (``residual_length``,
    ``q_group_size``)."""
    from transformers import DynamicCache

    if kind == "offloaded":
        # Offloading moves each layer's KV to CPU after use and prefetches it back; it exists for accelerators.
        device = next(model.parameters()).device
        if device.type == "cpu":
            return None, ("model runs on CPU: the offloaded cache moves KV from the accelerator to CPU RAM, which "
                          "is a no-op here (it would measure DynamicCache again)")
        return DynamicCache(config=model.config, offloading=True), None
    if kind == "quantized":
        reason = backend_missing(backend) if backend is not None else None
        if backend is None:
            backend, reason = quantized_backend()
        if reason is not None:
            return None, reason
        from transformers import QuantizedCache

        try:
            cache = QuantizedCache(backend=backend, config=model.config, nbits=nbits, **quant_options)
            # Exercise the backend once: some install but fail at the first quantization on CPU.
            probe = QuantizedCache(backend=backend, config=model.config, nbits=nbits, **quant_options)
            k = torch.zeros(1, model.config.num_key_value_heads, 2, _head_dim(model.config))
            probe.update(k, k, 0)
        except Exception as err:  # noqa: BLE001 - report any backend failure as a skip reason
            return None, f"quantized cache ({backend}) failed: {type(err).__name__}: {err}"
        return cache, None
    raise ValueError(f"unknown transformers cache kind {kind!r}")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
