"""The split FFN: hot neurons as registered parameters (placed by the device map), cold neurons on the CPU.

``dispatch`` swaps every FFN for a :class:`HotColdMLP`. Its hot slice is made of ``nn.Parameter``s, so Accelerate's
``infer_auto_device_map``/``max_memory`` count it and ``dispatch_model`` places it; its cold slice is held in plain
tensor attributes, which ``Module.to`` and the device map never move, so it stays in CPU memory (pinned when CUDA is
there) and is computed on the CPU while the fast device computes the hot slice; the two partial outputs are summed
on the fast device. This differs from a ``"cpu"`` entry in an Accelerate device map, which keeps weights on the CPU
but copies them to the GPU at every forward.

``restore`` rebuilds the original modules (same objects) with their full weights.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import GATED, PLAIN, FFNSite, decoder_layers, ffn_sites, fixed_bytes, neuron_bytes
from .placement import PlacementPlan

logger = logging.getLogger(__name__)

MODES = ("exact", "sparse")
# Up to this many tokens in one call, sparse mode gathers only the neurons that some token keeps (decode); above it
# (prefill) nearly every neuron is kept by some token and masking the dense product is cheaper.
_GATHER_MAX_TOKENS = 8

_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    # One worker: the cold matmuls already use torch's intra-op CPU threads; the worker only lets the CPU part
    # run while the fast device works on the hot part.
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h2o-cold-ffn")
    return _EXECUTOR


class HotColdMLP(nn.Module):
    """A feed-forward block split into a hot part (parameters) and a cold part (CPU tensors).

    Exact mode computes every neuron; sparse mode skips cold neurons whose ``|act(gate.x)|`` (``|act(fc1.x)|`` for
    plain FFNs) is below ``threshold`` (CATS). ``stats`` counts cold neuron evaluations kept and skipped.
    """

    def __init__(self, site: FFNSite, hot: list[int], *, pin: bool = False) -> None:
        super().__init__()
        self.kind = site.kind
        self.layer_index = site.index
        self.hidden_size = site.hidden_size
        self.n_neurons = site.n_neurons
        self.act_fn = site.act_fn
        self.mode = "exact"
        self.threshold: float | None = None
        self.stats = {"kept": 0, "seen": 0}
        hot_idx = torch.as_tensor(sorted(hot), dtype=torch.long)
        mask = torch.zeros(self.n_neurons, dtype=torch.bool)
        mask[hot_idx] = True
        cold_idx = (~mask).nonzero().squeeze(1)
        # Plain attributes, not buffers: only restore() needs them, and buffers would count against max_memory.
        self.hot_index, self.cold_index = hot_idx, cold_idx
        self.n_hot, self.n_cold = len(hot_idx), len(cold_idx)

        ins = [site.module.gate_proj, site.module.up_proj] if site.kind == GATED else [site.module.fc1]
        out = site.out_proj
        with torch.no_grad():
            w_in = torch.cat([lin.weight for lin in ins])  # [k*n, d]
            b_in = torch.cat([lin.bias for lin in ins]) if ins[0].bias is not None else None
            rows = lambda idx: torch.cat([idx + j * self.n_neurons for j in range(len(ins))])  # noqa: E731
            self.hot_in = nn.Parameter(w_in[rows(hot_idx)].contiguous(), requires_grad=False)
            self.hot_in_bias = (nn.Parameter(b_in[rows(hot_idx)].contiguous(), requires_grad=False)
                                if b_in is not None else None)
            self.hot_out = nn.Parameter(out.weight[:, hot_idx].contiguous(), requires_grad=False)
            self.out_bias = (nn.Parameter(out.bias.detach().clone(), requires_grad=False)
                             if out.bias is not None else None)
            # Cold rows stay neuron-major ([n_cold, d]) in every projection, so sparse mode can gather a neuron's
            # weights as contiguous rows.
            self.cold_in = w_in[rows(cold_idx)].contiguous()
            self.cold_in_bias = b_in[rows(cold_idx)].contiguous() if b_in is not None else None
            self.cold_out_t = out.weight[:, cold_idx].t().contiguous()
        if pin:
            self.cold_in = self.cold_in.pin_memory()
            self.cold_out_t = self.cold_out_t.pin_memory()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, hot={self.n_hot}, cold={self.n_cold}, mode={self.mode}"

    def hot_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def cold_bytes(self) -> int:
        ts = [self.cold_in, self.cold_out_t] + ([self.cold_in_bias] if self.cold_in_bias is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    # -- computation ---------------------------------------------------------------------------------------------
    def _act(self, h: torch.Tensor, n: int) -> torch.Tensor:
        if self.kind == GATED:
            return self.act_fn(h[:, :n]) * h[:, n:]
        return self.act_fn(h)

    def _hot(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_hot == 0:
            out = x.new_zeros(x.shape[0], self.hidden_size)
            return out + self.out_bias if self.out_bias is not None else out
        a = self._act(F.linear(x, self.hot_in, self.hot_in_bias), self.n_hot)
        return F.linear(a, self.hot_out, self.out_bias)

    def _cold(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "sparse" and self.threshold is not None:
            return self._cold_sparse(x)
        a = self._act(F.linear(x, self.cold_in, self.cold_in_bias), self.n_cold)
        return a @ self.cold_out_t

    def _cold_sparse(self, x: torch.Tensor) -> torch.Tensor:
        c = self.n_cold
        w_gate = self.cold_in[:c]
        b_gate = self.cold_in_bias[:c] if self.cold_in_bias is not None else None
        g = self.act_fn(F.linear(x, w_gate, b_gate))
        keep = g.abs() > self.threshold
        self.stats["kept"] += int(keep.sum())
        self.stats["seen"] += keep.numel()
        if self.kind == PLAIN:
            g = g.masked_fill(~keep, 0.0)
            idx = keep.any(0).nonzero().squeeze(1)
            return F.embedding_bag(idx.expand(x.shape[0], -1), self.cold_out_t, mode="sum",
                                   per_sample_weights=g[:, idx])
        if x.shape[0] <= _GATHER_MAX_TOKENS:
            idx = keep.any(0).nonzero().squeeze(1)
            w_up = self.cold_in[c:].index_select(0, idx)
            b_up = self.cold_in_bias[c:].index_select(0, idx) if self.cold_in_bias is not None else None
            a = g[:, idx] * F.linear(x, w_up, b_up)
            if x.shape[0] > 1:
                a = a * keep[:, idx]
            # embedding_bag sums the chosen rows of down^T weighted by `a` without copying them out first.
            return F.embedding_bag(idx.expand(x.shape[0], -1), self.cold_out_t, mode="sum", per_sample_weights=a)
        u = F.linear(x, self.cold_in[c:], self.cold_in_bias[c:] if self.cold_in_bias is not None else None)
        return (g * u * keep) @ self.cold_out_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if self.n_cold == 0:
            return self._hot(x2).view(*shape[:-1], self.hidden_size)
        if x2.device.type == "cpu":
            out = self._hot(x2) + self._cold(x2)
        else:
            job = _executor().submit(self._cold, x2.to("cpu", dtype=self.cold_in.dtype))
            hot = self._hot(x2)  # queued on the fast device while the CPU works on the cold part
            out = hot + job.result().to(x2.device, dtype=hot.dtype, non_blocking=True)
        return out.view(*shape[:-1], self.hidden_size)

    def rebuild_weights(self) -> dict[str, torch.Tensor]:
        """The dense weights (and biases) of the original projections, on the CPU."""
        k = 2 if self.kind == GATED else 1
        d, n = self.hidden_size, self.n_neurons
        hot_i, cold_i = self.hot_index, self.cold_index
        dtype = self.cold_in.dtype
        w_in = torch.empty(k * n, d, dtype=dtype)
        w_out = torch.empty(d, n, dtype=dtype)
        for j in range(k):
            w_in[hot_i + j * n] = self.hot_in.detach().cpu()[j * self.n_hot:(j + 1) * self.n_hot]
            w_in[cold_i + j * n] = self.cold_in[j * self.n_cold:(j + 1) * self.n_cold]
        w_out[:, hot_i] = self.hot_out.detach().cpu()
        w_out[:, cold_i] = self.cold_out_t.t()
        out = {"in": w_in, "out": w_out}
        if self.cold_in_bias is not None or self.hot_in_bias is not None:
            b = torch.empty(k * n, dtype=dtype)
            for j in range(k):
                if self.hot_in_bias is not None:
                    b[hot_i + j * n] = self.hot_in_bias.detach().cpu()[j * self.n_hot:(j + 1) * self.n_hot]
                if self.cold_in_bias is not None:
                    b[cold_i + j * n] = self.cold_in_bias[j * self.n_cold:(j + 1) * self.n_cold]
            out["in_bias"] = b
        if self.out_bias is not None:
            out["out_bias"] = self.out_bias.detach().cpu()
        return out


@dataclass
class OffloadState:
    """What ``dispatch`` changed, kept on the model as ``model.h2o_offload`` so ``restore`` can undo it."""

    plan: PlacementPlan
    device_map: dict[str, Any]
    originals: list[tuple[FFNSite, dict[str, nn.Module]]] = field(repr=False)


def _check_plan(sites: list[FFNSite], plan: PlacementPlan) -> None:
    plan.validate()
    if len(sites) != len(plan.hot):
        raise ValueError(f"plan has {len(plan.hot)} layers, the model has {len(sites)}")
    for s, n, b, f in zip(sites, plan.n_neurons, plan.neuron_bytes, plan.fixed_bytes, strict=True):
        if s.n_neurons != n or neuron_bytes(s) != b or fixed_bytes(s) != f:
            raise ValueError(f"plan does not fit layer {s.index}: {n} neurons x {b} B in the plan, "
                             f"{s.n_neurons} x {neuron_bytes(s)} B in the model (profile this model/dtype)")


def _empty_weights(lin: nn.Module) -> None:
    # The dense copy would double the FFN's memory; the weights are rebuilt from the split on restore(). The empty
    # placeholder keeps the original requires_grad, which restore() gives back.
    for name in ("weight", "bias"):
        p = getattr(lin, name, None)
        if p is not None:
            setattr(lin, name, nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad))


def split_ffns(model: nn.Module, plan: PlacementPlan, *, pin: bool | None = None) -> list[HotColdMLP]:
    """Swap every FFN of ``model`` (on the CPU) for a :class:`HotColdMLP` following ``plan``; no device moves."""
    if hasattr(model, "h2o_offload"):
        raise ValueError("model already has hot/cold FFNs; call restore(model) first")
    sites = ffn_sites(model)
    _check_plan(sites, plan)
    if any(s.in_proj.weight.device.type != "cpu" for s in sites):
        raise ValueError("split_ffns/dispatch expect the model on the CPU (load it with device='cpu')")
    pin = torch.cuda.is_available() if pin is None else pin
    originals: list[tuple[FFNSite, dict[str, nn.Module]]] = []
    new = []
    # The plan is checked above; should a layer still fail, the layers already split are put back, so the model is
    # never left half split (neither dispatch nor restore could handle that).
    model.h2o_offload = OffloadState(plan=plan, device_map={}, originals=originals)
    try:
        for site, hot in zip(sites, plan.hot, strict=True):
            new.append(_split_one(site, hot, pin, originals))
    except BaseException:
        restore(model)
        raise
    return new


def _split_one(site: FFNSite, hot: list[int], pin: bool, originals: list) -> HotColdMLP:
    mlp = HotColdMLP(site, hot, pin=pin)
    if site.kind == GATED:
        originals.append((site, {"mlp": site.module}))
        site.layer.mlp = mlp
        for lin in (site.module.gate_proj, site.module.up_proj, site.module.down_proj):
            _empty_weights(lin)
    else:
        originals.append((site, {n: getattr(site.layer, n) for n in ("fc1", "fc2", "activation_fn")}))
        # OPT's layer calls fc1 -> activation_fn -> fc2 itself: fc1 becomes the whole FFN, the rest identity.
        site.layer.fc1, site.layer.activation_fn, site.layer.fc2 = mlp, nn.Identity(), nn.Identity()
        for lin in (originals[-1][1]["fc1"], originals[-1][1]["fc2"]):
            _empty_weights(lin)
    return mlp


def hotcold_modules(model: nn.Module) -> list[HotColdMLP]:
    return [m for m in model.modules() if isinstance(m, HotColdMLP)]


def set_mode(model: nn.Module, mode: str, thresholds: list[float] | None = None) -> None:
    """Switch every :class:`HotColdMLP` to ``"exact"`` or ``"sparse"`` (with one threshold per layer)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    mods = hotcold_modules(model)
    if not mods:
        raise ValueError("model has no hot/cold FFNs; call dispatch(model, plan) first")
    if mode == "sparse":
        if thresholds is None or len(thresholds) != len(mods):
            raise ValueError(f"thresholds must give one value per layer ({len(mods)}) for mode='sparse'")
    for i, m in enumerate(mods):
        m.mode = mode
        m.threshold = float(thresholds[i]) if mode == "sparse" else None
        m.stats = {"kept": 0, "seen": 0}


def dispatch(
    model: nn.Module,
    plan: PlacementPlan | str | os.PathLike,
    *,
    max_memory: dict[int | str, int | str] | None = None,
    device_map: dict[str, Any] | str | None = None,
    mode: str = "exact",
    thresholds: list[float] | None = None,
) -> nn.Module:
    """Split every FFN by ``plan`` and place the model with Accelerate; returns ``model`` (changed in place).

    Args:
        plan: a :class:`PlacementPlan` for this model (same layers, neurons and dtype), or the path of a saved one.
        max_memory: per-device budget passed to ``infer_auto_device_map`` (e.g. ``{0: "2GiB", "cpu": "20GiB"}``);
            the hot neuron parameters count against it, the cold CPU tensors do not.
        device_map: an explicit map (or ``"auto"``) instead of ``max_memory``; with neither, everything goes to
            ``cuda:0`` when CUDA is there, else stays on the CPU.
        mode: ``"exact"`` (equals the dense FFN) or ``"sparse"`` (skip cold neurons under ``thresholds``, one per
            layer, see :func:`h2o_cache.offload.sparse.calibrate_thresholds`).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if not isinstance(plan, PlacementPlan):
        plan = PlacementPlan.load(plan)
    if device_map is not None and max_memory is not None and device_map != "auto":
        raise ValueError("pass device_map or max_memory, not both (max_memory is only used to infer a map)")
    if mode == "sparse" and thresholds is None:
        raise ValueError("mode='sparse' needs thresholds (one per layer)")
    split_ffns(model, plan)
    try:
        if device_map is None and max_memory is None:
            device_map = {"": 0 if torch.cuda.is_available() else "cpu"}
        elif device_map is None or device_map == "auto":
            from accelerate import infer_auto_device_map

            device_map = infer_auto_device_map(model, max_memory=max_memory,
                                               no_split_module_classes=getattr(model, "_no_split_modules", None))
        devices = set(device_map.values())
        if len(devices) == 1:
            model.to(next(iter(devices)) if next(iter(devices)) != "disk" else "cpu")
        else:
            from accelerate import dispatch_model

            dispatch_model(model, device_map=device_map)
        model.h2o_offload.device_map = dict(device_map)
        set_mode(model, mode, thresholds)
    except Exception:
        restore(model)
        raise
    logger.info("hot/cold FFNs dispatched: %d hot bytes of %d FFN bytes; device map %s",
                plan.hot_bytes, plan.ffn_bytes, sorted({str(v) for v in device_map.values()}))
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`dispatch`: put the original FFN modules back with their full weights (on the hot part's device)."""
    state: OffloadState | None = getattr(model, "h2o_offload", None)
    if state is None:
        raise ValueError("model has no hot/cold FFNs to restore")
    if len(set(map(str, state.device_map.values()))) > 1:
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(model)
    layers = decoder_layers(model)
    for site, orig in state.originals:
        layer = layers[site.index]
        mlp: HotColdMLP = layer.mlp if site.kind == GATED else layer.fc1
        device = mlp.hot_in.device if mlp.hot_in.device.type != "meta" else torch.device("cpu")
        w = {k: v.to(device) for k, v in mlp.rebuild_weights().items()}
        n = mlp.n_neurons
        if site.kind == GATED:
            m = orig["mlp"]
            pairs = [(m.gate_proj, w["in"][:n], "in_bias", 0), (m.up_proj, w["in"][n:], "in_bias", 1),
                     (m.down_proj, w["out"], "out_bias", None)]
            layer.mlp = m
        else:
            pairs = [(orig["fc1"], w["in"], "in_bias", 0), (orig["fc2"], w["out"], "out_bias", None)]
            layer.fc1, layer.activation_fn, layer.fc2 = orig["fc1"], orig["activation_fn"], orig["fc2"]
        for lin, weight, bias_key, part in pairs:
            lin.weight = nn.Parameter(weight.contiguous(), requires_grad=lin.weight.requires_grad)
            if bias_key in w:
                b = w[bias_key] if part is None else w[bias_key][part * n:(part + 1) * n]
                lin.bias = nn.Parameter(b.contiguous(), requires_grad=lin.bias.requires_grad)
    del model.h2o_offload
    return model


def placement_report(model: nn.Module) -> dict[str, int]:
    """Bytes held by the hot FFN parameters per device, and by the cold CPU tensors (key ``"cold_cpu"``)."""
    report: dict[str, int] = {}
    for m in hotcold_modules(model):
        for p in m.parameters():
            report[str(p.device)] = report.get(str(p.device), 0) + p.numel() * p.element_size()
        report["cold_cpu"] = report.get("cold_cpu", 0) + m.cold_bytes()
    return report
