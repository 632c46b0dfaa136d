"""H2OConfig: the KV budget and eviction policy, validated once, with errors that name the parameter."""

from __future__ import annotations

import logging
import numbers
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

POLICIES = ("h2o", "h2o_no_recent", "local", "streaming", "random", "keep_all")
GQA_AGGREGATIONS = ("mean", "max")
SCORE_NORMALIZATIONS = ("none", "age")
KV_BITS = (2, 4, 8)
KV_KEY_AXES = ("channel", "token")
LAYER_BUDGETS = ("uniform", "pyramid")

# The paper's (and its FlexGen implementation's) defaults: 10% heavy hitters + 10% recent tokens.
DEFAULT_HEAVY_RATIO = 0.1
DEFAULT_RECENT_RATIO = 0.1

# A prompt is scored in query chunks whose logits and probabilities should stay in the CPU's cache between the few
# ops that touch them: on the development machine (2 MiB of L2 per core) blocks of 4-9 MiB ran 1.3-1.7x faster
# than blocks of 18-72 MiB, at every batch and prompt length measured.
DEFAULT_PREFILL_CHUNK_BYTES = 8 * 2**20
# On a GPU the same 8 MiB gives a 32k-token prompt of an 8B model two queries per chunk, and the scoring of one
# prompt becomes ~500k tiny kernel launches (the first H100 run's H2O rows never finished): there a chunk is sized
# by memory instead (256 MiB: 64-128 queries at 16-32k tokens, 32 heads).
ACCELERATOR_PREFILL_CHUNK_BYTES = 256 * 2**20

# Ratio budgets below this many tokens (short prompts) are logged as a warning: a 42-token chat prompt at
# 10% + 10% keeps 8 tokens for the whole generation, and its answers degrade visibly.
SMALL_BUDGET_WARNING = 32
# Configs already warned about: an evaluation over many short prompts would otherwise log once per generate.
_warned_small: set = set()


@dataclass(frozen=True)
class H2OConfig:
    """What the cache keeps, per layer and per (sequence, KV head).

    The budget is given either as fractions of the prompt length (``heavy_ratio``/``recent_ratio``, resolved at
    prefill, as the paper's FlexGen implementation does) or as absolute token counts
    (``heavy_budget``/``recent_budget``), never both. Nothing given means 10% + 10%.

    Args:
        heavy_ratio / recent_ratio: fractions in (0, 1] of the prompt length.
        heavy_budget / recent_budget: token counts >= 0, at least one of them > 0.
        policy: how the non-recent slots are chosen: ``h2o`` (accumulated attention), ``h2o_no_recent`` (the whole
            budget goes to heavy hitters), ``local`` (the whole budget is a recent window), ``streaming``
            (``sink_tokens`` first tokens + recent window, as StreamingLLM), ``random`` (recent window + random
            older tokens). All policies share one eviction machinery and the same total budget. ``keep_all``
            evicts nothing: every token is kept and the budget options do not apply (they are ignored); with
            ``kv_bits`` it is quantisation alone, without it an uncompressed cache through the same machinery.
        sink_tokens: first tokens kept by the ``streaming`` policy.
        gqa_aggregation: how the query heads that share one KV head combine their attention into that head's
            scores: ``mean`` or ``max``.
        score_normalization: ``none`` (the paper: plain accumulated attention) or ``age`` (divide by the number
            of queries that have seen the token, so old tokens are not favoured merely for being old).
        prefill_chunk_size: queries per chunk when scoring a prompt; ``None`` picks it from
            ``prefill_chunk_bytes``. Peak scoring memory is O(prompt length x chunk).
        prefill_chunk_bytes: the most bytes one chunk's float32 attention block may take when
            ``prefill_chunk_size`` is None. ``None`` (default): 8 MiB on CPU, sized to stay in its cache, and
            256 MiB on GPUs, where launches, not the cache, are what a small chunk costs.
        seed: seed of the ``random`` policy.
        min_budget: a floor, in tokens, for ratio budgets (0: none): when the ratios give a prompt fewer tokens,
            the cache keeps ``min_budget`` tokens instead, split between heavy and recent in the ratios'
            proportion. Ratio budgets under ``SMALL_BUDGET_WARNING`` tokens without a floor are logged as a
            warning. Absolute budgets are taken as given.
        kv_bits: store the kept keys and values as packed ``kv_bits``-bit integers (2, 4 or 8) with 16-bit
            scales and zero points (``h2o_cache.quantized``); ``None`` (default) stores them in the model's dtype.
        kv_group_size: values per quantisation group: channels of one token for values (and for keys with
            ``kv_key_axis="token"``), so it must divide the head dimension; tokens per group for
            ``kv_key_axis="channel"`` keys.
        kv_key_axis: ``channel`` (default, as KIVI: each key channel has its own scale over a group of tokens,
            which keeps outlier channels from flattening the others) or ``token`` (one scale per group of a
            token's channels, like values).
        layer_budgets: how the total budget is shared by the layers: ``uniform`` (every layer the same) or
            ``pyramid`` (PyramidKV: a linear ramp, lower layers more, same total; ``layer_token_budgets``).
        pyramid_slope: the ramp of ``pyramid``, in (-1, 1): the first layer keeps ``1 + slope`` times the mean
            budget, the last ``1 - slope`` times (a negative slope gives the upper layers more).
        kv_residual: the newest tokens kept in full precision (KIVI's residual); with an evicting policy at most
            the recent window (``max(recent, 1)``) of them.

    Integer options accept any integer type (``numpy.int64``, a one-element integer tensor) and are stored as
    ``int``; ratios accept any real number and are stored as ``float``.
    """

    heavy_ratio: float | None = None
    recent_ratio: float | None = None
    heavy_budget: int | None = None
    recent_budget: int | None = None
    policy: str = "h2o"
    sink_tokens: int = 4
    gqa_aggregation: str = "mean"
    score_normalization: str = "none"
    prefill_chunk_size: int | None = None
    prefill_chunk_bytes: int | None = None
    seed: int = 0
    min_budget: int = 0
    kv_bits: int | None = None
    kv_group_size: int = 32
    kv_key_axis: str = "channel"
    kv_residual: int = 32
    layer_budgets: str = "uniform"
    pyramid_slope: float = 0.5

    def __post_init__(self) -> None:
        for name in ("heavy_budget", "recent_budget", "sink_tokens", "prefill_chunk_size", "prefill_chunk_bytes",
                     "seed", "min_budget", "kv_bits", "kv_group_size", "kv_residual"):
            object.__setattr__(self, name, _as_int(getattr(self, name)))
        for name in ("heavy_ratio", "recent_ratio", "pyramid_slope"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        ratios = (self.heavy_ratio, self.recent_ratio)
        budgets = (self.heavy_budget, self.recent_budget)
        uses_ratio = any(r is not None for r in ratios)
        uses_budget = any(b is not None for b in budgets)
        if uses_ratio and uses_budget:
            raise ValueError(
                "H2OConfig: give the budget either as heavy_ratio/recent_ratio or as heavy_budget/recent_budget, "
                f"not both (got heavy_ratio={self.heavy_ratio}, recent_ratio={self.recent_ratio}, "
                f"heavy_budget={self.heavy_budget}, recent_budget={self.recent_budget})"
            )
        if not uses_ratio and not uses_budget:
            object.__setattr__(self, "heavy_ratio", DEFAULT_HEAVY_RATIO)
            object.__setattr__(self, "recent_ratio", DEFAULT_RECENT_RATIO)
            uses_ratio = True
        if uses_ratio:
            for name in ("heavy_ratio", "recent_ratio"):
                value = getattr(self, name)
                if value is None:
                    object.__setattr__(self, name, 0.0)
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                    raise ValueError(f"H2OConfig: {name} must be a number in (0, 1], got {value!r}")
        else:
            for name in ("heavy_budget", "recent_budget"):
                value = getattr(self, name)
                if value is None:
                    object.__setattr__(self, name, 0)
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"H2OConfig: {name} must be an integer >= 0, got {value!r}")
            if self.heavy_budget + self.recent_budget == 0:
                raise ValueError("H2OConfig: heavy_budget + recent_budget must be >= 1 (got 0 + 0)")
            if self.min_budget:
                raise ValueError(
                    f"H2OConfig: min_budget (got {self.min_budget!r}) is a floor for heavy_ratio/recent_ratio; "
                    "with heavy_budget/recent_budget give the tokens you want directly"
                )
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("gqa_aggregation", self.gqa_aggregation, GQA_AGGREGATIONS)
        _check_choice("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS)
        _check_int("sink_tokens", self.sink_tokens, 0)
        if self.prefill_chunk_bytes is not None:
            _check_int("prefill_chunk_bytes", self.prefill_chunk_bytes, 1)
        if self.prefill_chunk_size is not None:
            _check_int("prefill_chunk_size", self.prefill_chunk_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("min_budget", self.min_budget, 0)
        if self.kv_bits is not None and (isinstance(self.kv_bits, bool) or not isinstance(self.kv_bits, int)
                                         or self.kv_bits not in KV_BITS):
            raise ValueError(f"H2OConfig: kv_bits={self.kv_bits!r} is not supported; choose one of "
                             f"{list(KV_BITS)} or None (no quantisation)")
        _check_int("kv_group_size", self.kv_group_size, 1)
        _check_choice("kv_key_axis", self.kv_key_axis, KV_KEY_AXES)
        _check_int("kv_residual", self.kv_residual, 0)
        _check_choice("layer_budgets", self.layer_budgets, LAYER_BUDGETS)
        if isinstance(self.pyramid_slope, bool) or not isinstance(self.pyramid_slope, (int, float)) or not (
                -1.0 < self.pyramid_slope < 1.0):
            raise ValueError(f"H2OConfig: pyramid_slope must be a number in (-1, 1), got {self.pyramid_slope!r}")

    def chunk_bytes(self, device_type: str) -> int:
        """``prefill_chunk_bytes``, or its default for a device of this type (``"cpu"``, ``"cuda"``, ...)."""
        if self.prefill_chunk_bytes is not None:
            return self.prefill_chunk_bytes
        return DEFAULT_PREFILL_CHUNK_BYTES if device_type == "cpu" else ACCELERATOR_PREFILL_CHUNK_BYTES

    @property
    def uses_ratios(self) -> bool:
        return self.heavy_budget is None

    def token_budgets(self, prompt_length: int) -> tuple[int, int]:
        """``(heavy, recent)`` in tokens for a prompt of ``prompt_length`` tokens (padding included)."""
        if not self.uses_ratios:
            return self.heavy_budget, self.recent_budget
        heavy = int(self.heavy_ratio * prompt_length)
        recent = int(self.recent_ratio * prompt_length)
        if heavy + recent < self.min_budget:
            heavy = round(self.min_budget * self.heavy_ratio / (self.heavy_ratio + self.recent_ratio))
            recent = self.min_budget - heavy
        if heavy + recent == 0:  # a tiny prompt must still leave room for the token being written
            recent = 1
        return heavy, recent

    def layer_token_budgets(self, prompt_length: int, layer_idx: int, num_layers: int | None) -> tuple[int, int]:
        """``(heavy, recent)`` of layer ``layer_idx``: ``token_budgets`` for ``uniform``; for ``pyramid`` the
        layers' totals follow a linear ramp (largest remainders keep the sum exactly ``num_layers`` times the
        uniform total, at least one token each) and each layer splits its total in the uniform proportion."""
        heavy, recent = self.token_budgets(prompt_length)
        if self.layer_budgets == "uniform":
            return heavy, recent
        if num_layers is None:
            raise ValueError("H2OConfig: layer_budgets='pyramid' needs the model's layer count: create the "
                             "H2OCache with the model's config")
        total = heavy + recent
        ramp = [1 + self.pyramid_slope * (1 - 2 * i / (num_layers - 1)) if num_layers > 1 else 1.0
                for i in range(num_layers)]
        shares = [max(1.0, total * r) for r in ramp]
        shares = [x * total * num_layers / sum(shares) for x in shares]
        totals = [int(x) for x in shares]
        for i in sorted(range(num_layers), key=lambda i: totals[i] - shares[i])[: total * num_layers - sum(totals)]:
            totals[i] += 1
        mine = totals[layer_idx]
        layer_heavy = min(mine - (recent > 0), round(mine * heavy / total))
        return layer_heavy, mine - layer_heavy

    def warn_if_small(self, prompt_length: int) -> None:
        """Log a warning when ratio budgets leave a short prompt only a handful of tokens (once per config)."""
        heavy, recent = self.token_budgets(prompt_length)
        if self.uses_ratios and self.policy != "keep_all" and heavy + recent < min(SMALL_BUDGET_WARNING, prompt_length) and self not in _warned_small:
            _warned_small.add(self)
            logger.warning(
                "H2O: heavy_ratio=%g + recent_ratio=%g of a %d-token prompt keep only %d tokens for the whole "
                "generation, which degrades answers; set min_budget (e.g. %d) or give heavy_budget/recent_budget",
                self.heavy_ratio, self.recent_ratio, prompt_length, heavy + recent, SMALL_BUDGET_WARNING,
            )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> H2OConfig:
        """Build from ``cache_config`` (``generate(..., cache_config={...})``), rejecting unknown keys."""
        if isinstance(options, H2OConfig):
            return options
        if options is not None and not isinstance(options, dict):
            raise ValueError(
                f"cache_config must be a dict of H2OConfig options (e.g. {{'heavy_ratio': 0.1, 'recent_ratio': 0.1}})"
                f" or an H2OConfig, got {type(options).__name__} {options!r}"
            )
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"cache_config: unknown option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_int(value: Any) -> Any:
    """An integer of any type (numpy, a one-element tensor) as ``int``; anything else unchanged, for the checks."""
    if value is None or isinstance(value, (bool, int)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _as_float(value: Any) -> Any:
    """A real number of any type (numpy, a one-element tensor) as ``float``; anything else unchanged."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "numel", None) is not None and getattr(value, "is_floating_point", None) is not None:
        if value.numel() == 1 and value.is_floating_point():
            return float(value.item())
    return value


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"H2OConfig: {name}={value!r} is not supported; choose one of {list(allowed)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"H2OConfig: {name} must be an integer >= {minimum}, got {value!r}")
