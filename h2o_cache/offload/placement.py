"""Choosing the hot neurons: which FFN neurons live on the fast device under a byte budget.

The objective is the activation mass (or firing count) the hot neurons capture, summed over layers. Every neuron of
a layer costs the same bytes, so without a per-layer minimum the optimum is a global top-k by score per byte (the
greedy solver is then exact); the ILP (scipy ``milp``/HiGHS, as PowerInfer's glpk ILP) adds a per-layer minimum
and per-layer costs, and solves over groups of ``group_size`` neurons ranked by score to stay small.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .profiler import NeuronProfile

logger = logging.getLogger(__name__)

SOLVERS = ("greedy", "ilp")
SCORES = ("mass", "count")


@dataclass
class PlacementPlan:
    """Hot neuron indices per layer, and what they cost and capture."""

    model_name: str
    budget_bytes: int
    solver: str
    score: str
    min_per_layer: int
    neuron_bytes: list[int]
    fixed_bytes: list[int]  # per layer: output biases, always on the fast device
    n_neurons: list[int]
    hot: list[list[int]]  # per layer, sorted neuron indices kept on the fast device
    captured: float  # fraction of the profile's total score held by the hot neurons

    @property
    def hot_bytes(self) -> int:
        """Bytes the hot part (hot neurons plus output biases) takes on the fast device."""
        return sum(self.fixed_bytes) + sum(b * len(h) for b, h in zip(self.neuron_bytes, self.hot, strict=True))

    @property
    def ffn_bytes(self) -> int:
        return sum(self.fixed_bytes) + sum(b * n for b, n in zip(self.neuron_bytes, self.n_neurons, strict=True))

    def validate(self) -> None:
        """Raise ``ValueError`` unless every layer lists unique neuron indices within its neuron count.

        A repeated index would be computed twice (the output silently changes) and an index out of range would fail
        only when that layer is split, so the whole plan is checked before any model is touched.
        """
        layers = len(self.hot)
        for name in ("n_neurons", "neuron_bytes", "fixed_bytes"):
            if len(getattr(self, name)) != layers:
                raise ValueError(f"plan.{name} has {len(getattr(self, name))} entries, plan.hot has {layers} layers")
        for i, (hot, n) in enumerate(zip(self.hot, self.n_neurons, strict=True)):
            if not isinstance(hot, list | tuple) or not all(
                    isinstance(j, numbers.Integral) and not isinstance(j, bool) for j in hot):
                raise ValueError(f"plan.hot[{i}] must be a list of integer neuron indices")
            if len(set(hot)) != len(hot):
                seen: set[int] = set()
                dupes = sorted({j for j in hot if j in seen or seen.add(j)})
                raise ValueError(f"plan.hot[{i}] repeats neuron indices {dupes[:8]}; each neuron may be hot once")
            bad = [int(j) for j in hot if not 0 <= j < n]
            if bad:
                raise ValueError(f"plan.hot[{i}] has neuron indices {bad[:8]} outside [0, {n})")

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"format": "h2o_cache.placement/1", **asdict(self)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PlacementPlan:
        try:
            blob = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"plan={str(path)!r}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"plan={str(path)!r} is not an h2o-cache placement plan (not JSON: {err})") from None
        if not isinstance(blob, dict) or blob.pop("format", None) != "h2o_cache.placement/1":
            raise ValueError(f"plan={str(path)!r} is not an h2o-cache placement plan")
        try:
            plan = cls(**blob)
        except TypeError as err:
            raise ValueError(f"plan={str(path)!r} is a damaged placement plan: {err}") from None
        try:
            plan.validate()
        except ValueError as err:
            raise ValueError(f"plan={str(path)!r}: {err}") from None
        return plan


def _scores(profile: NeuronProfile, score: str) -> list[np.ndarray]:
    if score not in SCORES:
        raise ValueError(f"score={score!r}; choose one of {SCORES}")
    src = profile.mass if score == "mass" else profile.counts
    return [t.double().numpy() for t in src]


def place(
    profile: NeuronProfile,
    budget_bytes: int,
    *,
    solver: str = "greedy",
    score: str = "mass",
    min_per_layer: int = 0,
    group_size: int = 16,
    time_limit: float = 30.0,
) -> PlacementPlan:
    """Pick hot neurons maximising the captured score under ``budget_bytes`` of fast-device memory.

    Args:
        budget_bytes: bytes of FFN weights allowed on the fast device (``profile.ffn_bytes()`` holds everything).
        solver: ``"greedy"`` or ``"ilp"``.
        score: ``"mass"`` (sum of |activation|) or ``"count"`` (firing frequency, PowerInfer's objective).
        min_per_layer: hot neurons every layer must get (the budget must cover them).
        group_size: ILP only: neurons are chosen in rank-ordered groups of this size (1 = per neuron).
        time_limit: ILP only: seconds HiGHS may run; the best solution found so far is used.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; choose one of {SOLVERS}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes} must be >= 0")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    scores = _scores(profile, score)
    sizes = [len(s) for s in scores]
    if not 0 <= min_per_layer <= min(sizes):
        raise ValueError(f"min_per_layer={min_per_layer} must be between 0 and {min(sizes)} (neurons per layer)")
    cost = profile.neuron_bytes
    floor = sum(profile.fixed_bytes) + sum(min_per_layer * c for c in cost)
    if floor > budget_bytes:
        raise ValueError(f"budget_bytes={budget_bytes} cannot hold the output biases and "
                         f"min_per_layer={min_per_layer} ({floor} bytes)")
    room = budget_bytes - sum(profile.fixed_bytes)
    order = [np.argsort(-s, kind="stable") for s in scores]
    take = (_greedy if solver == "greedy" else _ilp)(scores, order, cost, room, min_per_layer,
                                                     group_size, time_limit)
    hot = [sorted(int(i) for i in order[layer][:k]) for layer, k in enumerate(take)]
    total = sum(float(s.sum()) for s in scores)
    captured = sum(float(s[h].sum()) for s, h in zip(scores, hot, strict=True)) / total if total > 0 else 0.0
    plan = PlacementPlan(model_name=profile.model_name, budget_bytes=int(budget_bytes), solver=solver, score=score,
                         min_per_layer=min_per_layer, neuron_bytes=list(cost),
                         fixed_bytes=list(profile.fixed_bytes), n_neurons=sizes, hot=hot,
                         captured=captured)
    logger.info("%s placement: %d hot neurons, %d of %d bytes, captured %.4f",
                solver, sum(take), plan.hot_bytes, budget_bytes, captured)
    return plan


def _greedy(scores, order, cost, budget, min_per_layer, _group, _limit) -> list[int]:
    take = [min_per_layer] * len(scores)
    left = budget - sum(min_per_layer * c for c in cost)
    # Candidates beyond the forced minimum, best score per byte first; within a layer the ranks stay in order.
    layer_ids = np.concatenate([np.full(len(s) - min_per_layer, i) for i, s in enumerate(scores)])
    values = np.concatenate([s[o[min_per_layer:]] / cost[i] for i, (s, o) in enumerate(zip(scores, order,
                                                                                           strict=True))])
    for layer in layer_ids[np.argsort(-values, kind="stable")]:
        if cost[layer] <= left:
            take[layer] += 1
            left -= cost[layer]
    return take


def _ilp(scores, order, cost, budget, min_per_layer, group, limit) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    # Variable per (layer, group of `group` rank-ordered neurons); x = 1 puts the whole group on the fast device.
    values, weights, sizes, owner = [], [], [], []
    for layer, (s, o) in enumerate(zip(scores, order, strict=True)):
        ranked = s[o]
        for start in range(0, len(ranked), group):
            n = min(group, len(ranked) - start)
            values.append(ranked[start:start + n].sum())
            weights.append(n * cost[layer])
            sizes.append(n)
            owner.append(layer)
    n_var, n_layers = len(values), len(scores)
    a = lil_matrix((1 + n_layers, n_var))
    a[0, :] = np.asarray(weights, dtype=float)
    for j, layer in enumerate(owner):
        a[1 + layer, j] = sizes[j]
    lower = np.concatenate([[-np.inf], np.full(n_layers, float(min_per_layer))])
    upper = np.concatenate([[float(budget)], np.full(n_layers, np.inf)])
    scale = max(max(values), 1e-30)  # keep the objective near 1 for HiGHS' tolerances
    res = milp(c=-np.asarray(values) / scale, constraints=LinearConstraint(a.tocsr(), lower, upper),
               integrality=np.ones(n_var), bounds=Bounds(0, 1), options={"time_limit": limit, "disp": False})
    if res.x is None:
        raise RuntimeError(f"the ILP found no feasible placement: {res.message}")
    x = np.round(res.x).astype(bool)
    take = [0] * n_layers
    for layer in range(n_layers):
        # Groups chosen within a layer are not always a prefix of the ranking; keep the count (the top ones are
        # worth at least as much, so taking the prefix never lowers the objective).
        take[layer] = int(sum(sizes[j] for j in range(n_var) if owner[j] == layer and x[j]))
    logger.debug("ILP status %s: %s", res.status, res.message)
    return take


def capture_curve(
    profile: NeuronProfile, fractions: Sequence[float], *, solver: str = "greedy", score: str = "mass",
    min_per_layer: int = 0,
) -> list[tuple[float, int, float]]:
    """``(fraction, budget_bytes, captured)`` for budgets given as fractions of all FFN bytes."""
    total = profile.ffn_bytes()
    out = []
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fractions must lie in [0, 1], got {f}")
        budget = int(math.floor(f * total))
        out.append((f, budget, place(profile, budget, solver=solver, score=score,
                                     min_per_layer=min_per_layer).captured))
    return out


def plot_capture_curve(curve: Sequence[tuple[float, int, float]], path: str | os.PathLike, title: str = "") -> None:
    """Save a captured-mass-vs-budget plot (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([100 * f for f, _, _ in curve], [100 * c for _, _, c in curve], marker="o")
    ax.plot([0, 100], [0, 100], ls="--", c="grey", lw=0.8, label="uniform")
    ax.set_xlabel("fast-device budget (% of FFN bytes)")
    ax.set_ylabel("captured activation mass (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def hot_mask(plan: PlacementPlan, layer: int) -> torch.Tensor:
    """Boolean ``[n_neurons]`` mask of layer ``layer``'s hot neurons."""
    mask = torch.zeros(plan.n_neurons[layer], dtype=torch.bool)
    mask[plan.hot[layer]] = True
    return mask
