"""Neuron activation profiler: how often and how strongly each FFN neuron fires on real text.

The activation that matters for a neuron is what multiplies its output column: ``act(gate.x) * up.x`` for SwiGLU
(``metric="product"``), or ``act(gate.x)`` alone (``metric="gate"``, the quantity CATS thresholds), and
``act(fc1.x)`` for ReLU-style FFNs. It is read with a forward pre-hook on the output projection (or a forward hook
on the input projection), so the profiled model runs its own, unmodified forward.

"Fires" means ``> 0`` for ReLU-family activations (PowerInfer's rule). SiLU/GELU neurons are almost never exactly
zero, so for them a neuron fires on a token when its ``|activation|`` exceeds that layer's mean ``|activation|`` on
the same token; the mass (sum of ``|activation|``) is the score placement uses by default either way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import atomic_write
from ._layers import GATED, ffn_sites, fixed_bytes, neuron_bytes

logger = logging.getLogger(__name__)

METRICS = ("product", "gate")
_RELU_LIKE = ("ReLU", "ReLU6", "ReLUSquaredActivation", "ReLUActivation")


@dataclass
class NeuronProfile:
    """Per-layer, per-neuron activation statistics plus what is needed to cost a placement."""

    model_name: str
    kind: str  # "gated" or "plain"
    metric: str
    fire_rule: str
    tokens_seen: int
    hidden_size: int
    neuron_bytes: list[int]  # per layer
    fixed_bytes: list[int]  # per layer: the output bias, which always sits with the hot part
    counts: list[torch.Tensor] = field(repr=False)  # per layer, [n_neurons] int64: tokens on which it fired
    mass: list[torch.Tensor] = field(repr=False)  # per layer, [n_neurons] float64: sum of |activation|
    source: str = ""

    @property
    def n_layers(self) -> int:
        return len(self.mass)

    def frequency(self, layer: int) -> torch.Tensor:
        return self.counts[layer].double() / max(self.tokens_seen, 1)

    def ffn_bytes(self) -> int:
        """Bytes of all FFN weights (what a 100% budget holds)."""
        return sum(self.fixed_bytes) + sum(b * len(m) for b, m in zip(self.neuron_bytes, self.mass, strict=True))

    def save(self, path: str | os.PathLike) -> None:
        meta = {k: v for k, v in asdict(self).items() if k not in ("counts", "mass")}
        with atomic_write(path) as tmp:
            torch.save({"format": "h2o_cache.neuron_profile/1", "meta": json.dumps(meta),
                        "counts": list(self.counts), "mass": list(self.mass)}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronProfile:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"profile={str(path)!r}: no such file")
        try:
            blob = torch.load(p, weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for foreign files
            raise ValueError(f"profile={str(path)!r} is not an h2o-cache neuron profile "
                             f"({type(err).__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != "h2o_cache.neuron_profile/1":
            raise ValueError(f"profile={str(path)!r} is not an h2o-cache neuron profile")
        try:
            return cls(**json.loads(blob["meta"]), counts=blob["counts"], mass=blob["mass"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"profile={str(path)!r} is a damaged h2o-cache neuron profile "
                             f"({type(err).__name__}: {err})") from None


def read_texts(path: str | os.PathLike | None = None, *, field_name: str = "text") -> list[str]:
    """Texts to profile on: ``None`` gives the Python reference (``pydoc_data.topics``), a ``.jsonl`` file gives
    each record's ``field_name``, any other file is read as one text."""
    if path is None:
        from h2o_cache.models import reference_text

        return [reference_text()]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text={str(path)!r}: no such file")
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(_read_utf8(p).splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p}:{n}: not a JSON record ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{p}:{n}: expected a JSON object, got {type(record).__name__}")
                if field_name not in record:
                    raise ValueError(f"{p}:{n}: record has no field {field_name!r} (set field_name=)")
                texts.append(str(record[field_name]))
        return texts
    return [_read_utf8(p)]


def _read_utf8(p: Path) -> str:
    if p.is_dir():
        raise ValueError(f"text={str(p)!r} is a folder; give a .jsonl or text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text={str(p)!r} is not UTF-8 text (byte {err.start})") from None


def token_windows(tokenizer, texts: Iterable[str], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Cut the tokenised texts into full windows of ``seq_len`` tokens, at most ``max_tokens`` in all."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} must be >= seq_len={seq_len}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    ids = ids[: max_tokens - max_tokens % seq_len]
    if len(ids) < seq_len:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    return list(torch.tensor(ids).view(-1, seq_len))


@torch.no_grad()
def profile(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    *,
    metric: str = "product",
    batch_size: int = 4,
    model_name: str | None = None,
    source: str = "",
    progress: bool = True,
) -> NeuronProfile:
    """Run ``model`` over token ``windows`` (each ``[seq_len]``) and record every FFN neuron's activations.

    Args:
        metric: ``"product"`` (``|act(gate)*up|``) or ``"gate"`` (``|act(gate)|``); ReLU-style FFNs have no up
            projection, so both mean ``act(fc1.x)`` there.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; choose one of {METRICS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    sites = ffn_sites(model)
    relu = type(sites[0].act_fn).__name__ in _RELU_LIKE
    counts = [torch.zeros(s.n_neurons, dtype=torch.int64) for s in sites]
    mass = [torch.zeros(s.n_neurons, dtype=torch.float64) for s in sites]

    def record(i: int, act: torch.Tensor) -> None:
        a = act.detach().reshape(-1, act.shape[-1]).float()
        if relu:
            fired = a > 0
        else:
            a = a.abs()
            fired = a > a.mean(dim=-1, keepdim=True)
        counts[i] += fired.sum(0).cpu()
        mass[i] += a.abs().sum(0, dtype=torch.float64).cpu()

    handles = []
    for s in sites:
        if metric == "gate" and s.kind == GATED:
            act_fn = s.act_fn
            handles.append(s.in_proj.register_forward_hook(
                lambda _m, _inp, out, i=s.index, f=act_fn: record(i, f(out))))
        else:
            handles.append(s.out_proj.register_forward_pre_hook(lambda _m, inp, i=s.index: record(i, inp[0])))
    device = next(model.parameters()).device
    tokens = 0
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="profiling", unit="batch", disable=not progress):
            batch = torch.stack(list(windows[start:start + batch_size])).to(device)
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    name = model_name or getattr(model.config, "name_or_path", "") or type(model).__name__
    logger.info("profiled %d tokens over %d layers of %s", tokens, len(sites), name)
    return NeuronProfile(
        model_name=str(name), kind=sites[0].kind, metric=metric if sites[0].kind == GATED else "act",
        fire_rule="act>0" if relu else "|act|>layer mean", tokens_seen=tokens,
        hidden_size=sites[0].hidden_size, neuron_bytes=[neuron_bytes(s) for s in sites],
        fixed_bytes=[fixed_bytes(s) for s in sites],
        counts=counts, mass=mass, source=source,
    )
