"""Layer streaming (AirLLM-style) for weights that still do not fit on the fast device.

Each streamed decoder layer keeps its weights in CPU memory (pinned when CUDA is there) or in one safetensors file
per layer; its parameters are ``meta`` between uses. A forward pre-hook brings the layer's weights to the fast
device and starts loading the NEXT streamed layer on a worker thread (and, with CUDA, on a side stream), so the
copy of layer ``i+1`` overlaps the computation of layer ``i``; a forward hook drops the weights again. Layer files
are read whole with one ``readinto`` (which releases the GIL) and sliced into zero-copy views.

Accelerate's own offload (``"cpu"``/``"disk"`` in a device map) loads each weight when its module runs, without
read-ahead; ``eval/offload_bench.py`` measures the two side by side.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ._layers import decoder_layers

logger = logging.getLogger(__name__)

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool, "F64": torch.float64}


def _layout(path: str | os.PathLike) -> tuple[int, int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """``(data offset, data bytes, [(name, dtype, shape, start, end)])`` of a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        size = os.fstat(f.fileno()).st_size - 8 - header_len
    header.pop("__metadata__", None)
    entries = [(name, _ST_DTYPES[info["dtype"]], info["shape"], *info["data_offsets"]) for name, info in header.items()]
    return 8 + header_len, size, entries


def _read_into(path, offset: int, size: int, buf: torch.Tensor, entries) -> dict[str, torch.Tensor]:
    view = memoryview(buf.numpy()).cast("B")[:size]
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < size:
            n = f.readinto(view[got:])  # releases the GIL while the kernel copies
            if not n:
                raise OSError(f"{path}: file ended after {got} of {size} data bytes")
            got += n
    return {name: buf[start:end].view(dtype).view(shape) for name, dtype, shape, start, end in entries}


def read_safetensors(path: str | os.PathLike, *, pin: bool = False) -> dict[str, torch.Tensor]:
    """Read a safetensors file with one read into one (optionally pinned) buffer; tensors are views into it."""
    offset, size, entries = _layout(path)
    return _read_into(path, offset, size, torch.empty(size, dtype=torch.uint8, pin_memory=pin), entries)


@dataclass
class StreamStats:
    loads: int = 0
    prefetch_hits: int = 0  # loads that were already under way (or done) when the layer was needed


class LayerStreamer:
    """Streams decoder layers' weights to ``device`` around their forward; see the module docstring.

    Use :func:`stream_layers` to build one; :meth:`remove` brings every weight back to ``device`` and removes the
    hooks.
    """

    def __init__(self, model: nn.Module, layer_ids: list[int], device: torch.device, *,
                 offload_dir: Path | None, prefetch: bool) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.layer_ids = layer_ids
        self.device = device
        self.offload_dir = offload_dir
        self.prefetch = prefetch
        self.stats = StreamStats()
        self._pin = device.type == "cuda"
        self._cpu: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h2o-layer-prefetch")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._handles = []
        self._removed = False
        self._layouts: dict[int, tuple[int, int, list]] = {}
        # Two reusable host buffers (ping-pong): the layer being computed reads one while the next is read into
        # the other, and no fresh pages have to be faulted in and zeroed at every load.
        self._buffers: list[torch.Tensor] = []
        self._turn = 0
        self._next = {a: b for a, b in zip(layer_ids, layer_ids[1:] + layer_ids[:1], strict=True)}
        for i in layer_ids:
            if any(t.device.type == "meta" for t in self.layers[i].state_dict().values()):
                raise ValueError(f"layer {i} has no weights (meta): is this model already streamed? Call remove() "
                                 "on its LayerStreamer first")
        done: list[int] = []
        try:
            for i in layer_ids:
                layer = self.layers[i]
                state = {k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict(keep_vars=True).items()}
                if offload_dir is not None:
                    save_file(state, str(self._file(i)))
                    self._layouts[i] = _layout(self._file(i))
                else:
                    self._cpu[i] = {k: (v.pin_memory() if self._pin else v) for k, v in state.items()}
                layer.to("meta")
                done.append(i)
                self._handles.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
                self._handles.append(layer.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))
        except BaseException:
            # e.g. a full disk half way: put back the layers already moved out, so the model is whole again.
            self.layer_ids = done
            self.remove()
            raise

    def _file(self, i: int) -> Path:
        assert self.offload_dir is not None
        return self.offload_dir / f"layer_{i:03d}.safetensors"

    def _host(self, i: int) -> dict[str, torch.Tensor]:
        if self.offload_dir is None:
            return self._cpu[i]
        offset, size, entries = self._layouts[i]
        if not self._buffers:
            biggest = max(lay[1] for lay in self._layouts.values())
            self._buffers = [torch.empty(biggest, dtype=torch.uint8, pin_memory=self._pin) for _ in range(2)]
        buf = self._buffers[self._turn]
        self._turn ^= 1
        return _read_into(self._file(i), offset, size, buf, entries)

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        host = self._host(i)
        if self.device.type == "cpu":
            # From RAM, "loading" to the CPU is a no-op; from disk the read above was the load.
            return host
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                out = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
            if self.offload_dir is not None:
                event.synchronize()  # the host buffer is reused two loads later: the copy must be done by then
            return {"__event__": event, **out}  # type: ignore[dict-item]
        return {k: v.to(self.device) for k, v in host.items()}

    def _before(self, i: int) -> None:
        fut = self._pending.pop(i, None)
        if fut is not None:
            self.stats.prefetch_hits += 1
            tensors = fut.result()
        else:
            tensors = self._load(i)
        event = tensors.pop("__event__", None)
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for t in tensors.values():
                # Allocated on the copy stream but read on the main one: without this the allocator could hand the
                # memory to a later prefetch while the main stream's kernels still read it.
                t.record_stream(main)
        self.layers[i].load_state_dict(tensors, assign=True, strict=True)
        self.stats.loads += 1
        if self.prefetch:
            nxt = self._next[i]
            if nxt != i and nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._load, nxt)

    def _after(self, i: int) -> None:
        self.layers[i].to("meta")

    def remove(self) -> None:
        """Stop streaming: every streamed layer gets its weights back on ``device`` and the hooks go (once; a
        second call does nothing, as the layer files are gone)."""
        if self._removed:
            return
        self._removed = True
        for h in self._handles:
            h.remove()
        for fut in self._pending.values():
            fut.result()
        self._pending.clear()
        self._pool.shutdown()
        for i in self.layer_ids:
            tensors = self._load(i)  # cloned below: the ping-pong buffers are reused
            tensors.pop("__event__", None)
            if self._stream is not None:
                self._stream.synchronize()
            self.layers[i].load_state_dict({k: v.clone() for k, v in tensors.items()}, assign=True, strict=True)
        self._cpu.clear()
        if self.offload_dir is not None:
            shutil.rmtree(self.offload_dir, ignore_errors=True)


def stream_layers(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    layers: list[int] | None = None,
    offload_dir: str | os.PathLike | None = None,
    prefetch: bool = True,
) -> LayerStreamer:
    """Keep decoder ``layers`` (default: all) off the fast device and stream them in during each forward.

    Args:
        device: the fast device (default ``cuda:0`` if there, else ``cpu``); the rest of the model must be there.
        layers: indices of the decoder layers to stream (the others stay resident).
        offload_dir: a folder for the disk tier; each streamer writes one safetensors file per layer into its own
            new subfolder (so several models may share ``offload_dir``), deleted by :meth:`LayerStreamer.remove`.
            ``None`` keeps the layers in CPU memory.
        prefetch: load the next streamed layer while the current one computes.
    """
    dev = torch.device(device if device is not None else ("cuda:0" if torch.cuda.is_available() else "cpu"))
    n = len(decoder_layers(model))
    ids = list(range(n)) if layers is None else sorted(set(layers))
    if not ids or ids[0] < 0 or ids[-1] >= n:
        raise ValueError(f"layers={layers} must be non-empty indices in [0, {n})")
    folder = None
    if offload_dir is not None:
        parent = Path(offload_dir)
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"offload_dir={str(offload_dir)!r} is a file; give a folder")
        parent.mkdir(parents=True, exist_ok=True)
        # A private subfolder per streamer: two models streamed from the same offload_dir must never read (or, on
        # remove(), keep) each other's layer files.
        folder = Path(tempfile.mkdtemp(prefix="h2o-stream-", dir=parent))
    try:
        streamer = LayerStreamer(model, ids, dev, offload_dir=folder, prefetch=prefetch)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    logger.info("streaming %d layers to %s from %s (prefetch=%s)", len(ids), dev, folder or "CPU memory", prefetch)
    return streamer
