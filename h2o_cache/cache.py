"""H2OCache: a ``transformers.Cache`` whose layers keep heavy hitters + recent tokens within a fixed budget.

Storage (``H2OLayer``), per layer, shaped ``[batch, kv_heads, slots, head_dim]``:

- Until the budget is reached, tokens are appended as in ``DynamicLayer`` and nothing is evicted.
- Past the budget, the layer holds exactly ``budget + 1`` slots: ``budget`` kept tokens and one scratch slot
  (the last). A decode step writes the new token into the scratch slot, attention runs over all slots, the
  scores are accumulated, and then ONE victim per (sequence, KV head) is chosen among the non-recent slots;
  the scratch slot's contents move into the victim's slot. A decode step therefore copies O(head_dim) per head
  instead of re-concatenating the cache, and the stored size is constant however long generation runs.
- Each (sequence, KV head) keeps its own set of tokens, so slots hold different positions per head; the layer
  records each slot's sequence index (``positions``), its accumulated attention (``scores``, float32 whatever
  the model dtype) and, once padding was seen, whether it is a real token (``valid``).
- With ``H2OConfig.kv_bits`` the cache creates ``QuantizedH2OLayer`` (``h2o_cache.quantized``) instead: the same
  slots and eviction, with the kept keys and values stored as packed integers (``layer_class``).

Order within a step: update (store) -> attention over stored + new tokens (``h2o_cache.attention``) -> scores
accumulate -> evict. Eviction happens after the step has attended, and the newest token is always in the
protected recent window, so the token just written is never the one evicted.

The link between ``update`` (which has no query) and the attention function (which gets no cache object): the
cache marks the updated layer as *pending* in a thread-local slot; the wrapped attention functions registered by
``h2o_cache.patches`` claim it for the module with the same ``layer_idx``. A thread-local attribute, not a
``ContextVar``: dynamo traces (and guards on) attribute reads and writes of a ``threading.local`` but cannot trace
``ContextVar.get``, and the wrapper runs inside every model's forward, H2O or not, compiled or not. A layer whose
attention never claimed it (a model whose attention bypasses transformers' attention registry) is reported at its
next update.

Masks: transformers builds one mask for all layers from ``get_mask_sizes`` and assumes stored tokens are
contiguous positions, which evicted, per-head token sets are not. ``get_mask_sizes`` returns
``kv_offset = seen - stored`` so that the mask's last ``q`` columns describe the new tokens exactly; the attention
code reads only those columns (padding of the new tokens) and masks stored tokens with the layer's own ``valid``.
``get_seq_length`` returns tokens *seen*, so position ids (hence RoPE) stay absolute after eviction.

Hybrid models (Gemma 2/3, GPT-OSS, Cohere 2, Qwen2 with ``use_sliding_window``, ...): the cache follows
``config.layer_types`` (``H2OCache._new_layer`` is the one place that picks a layer's class). Full-attention
layers are H2O layers; sliding-window and chunked layers keep transformers' own ``DynamicSlidingWindowLayer``,
whose memory the window already bounds. Only H2O layers are ever marked pending, so the attention of a sliding
layer runs in the backend untouched; transformers builds the full-attention mask from the first H2O layer's
``get_mask_sizes`` and the sliding mask from the first sliding layer's, as for its own hybrid ``DynamicCache``.
A model whose every layer slides (Mistral with ``sliding_window``) gets no H2O layer at all: H2O over a window
would either attend to tokens the model masks out (not the model any more) or drop tokens inside the window.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from .config import H2OConfig
from .policies import get_policy
from .support import FULL_ATTENTION

logger = logging.getLogger(__name__)

# `.layer`: the layer whose `update` ran last in this thread and whose attention has not consumed it yet.
_PENDING = threading.local()

_POS_INF = float("inf")


def claim_pending(layer_idx: int | None, key: torch.Tensor) -> H2OLayer | None:
    """The pending H2O layer if this attention call is its step (and mark it consumed), else None.

    The step is recognised by the very key tensor ``update`` returned, so a layer left pending by a forward
    that failed can never be claimed by an unrelated attention call (e.g. a later forward with another cache).
    """
    layer = getattr(_PENDING, "layer", None)
    if layer is None or layer.layer_idx != layer_idx or layer.keys is not key:
        return None
    _PENDING.layer = None
    layer.awaiting_attention = False
    return layer


class H2OLayer(CacheLayerMixin):
    """One layer's H2O storage and eviction (see the module docstring)."""

    is_sliding = False
    # What transformers' generate(compile_config=...) asks: after prefill the layer holds a fixed budget + 1 slots
    # and a decode step only writes into them in place (no host sync, no data-dependent Python branch), so the
    # compiled decode step has static shapes and no graph break. Prefill and chunked steps (growing shapes) run
    # uncompiled in generate, as for StaticCache.
    is_compileable = True
    # Evicted tokens are gone, so a rollback (assisted decoding) cannot be honoured.
    is_croppable = False
    # Every tensor held per stored token, by what it is for: `_apply` moves them together and `kv_bytes` counts
    # them all (a subclass with another storage lists its own).
    _BYTE_GROUPS: dict[str, tuple[str, ...]] = {
        "keys": ("keys",), "values": ("values",), "quant_params": (), "bookkeeping": ("scores", "positions", "valid"),
    }
    # Scalar state that `concatenate` requires equal and copies.
    _STATE: tuple[str, ...] = ("seen", "heavy", "recent", "slot_mode", "evicted")

    def __init__(self, h2o_config: H2OConfig, layer_idx: int, prompt_length: int | None = None):
        super().__init__()
        self.h2o_config = h2o_config
        self.policy = get_policy(h2o_config.policy)
        self.layer_idx = layer_idx
        self.num_layers: int | None = None  # the model's, set by H2OCache: per-layer budgets need it
        self.budget_index = layer_idx  # this layer's rank among the H2O layers (hybrid models: not layer_idx)
        self.prompt_length = prompt_length  # what ratio budgets resolve against; None: the first update's length
        self.seen = 0
        self.heavy: int | None = None  # slots, fixed by the first update (the prompt)
        self.recent: int | None = None
        self.scores: torch.Tensor | None = None  # [B, H, S] float32, only for policies that rank by attention
        self.positions: torch.Tensor | None = None  # [B, H, S] int32, materialised at the first eviction
        self.valid: torch.Tensor | None = None  # [B, H, S] bool, materialised when padding is first seen
        self.slot_mode = False  # True once the layer holds budget + 1 slots
        self.new_tokens = 0  # tokens added by the current step
        self.awaiting_attention = False
        self.evicted = 0  # tokens evicted per (sequence, head) so far

    # ---- CacheLayerMixin contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        bsz, heads = key_states.shape[:2]
        self.keys = key_states.new_empty(bsz, heads, 0, key_states.shape[-1])
        self.values = value_states.new_empty(bsz, heads, 0, value_states.shape[-1])
        if self.policy.needs_scores:
            self.scores = torch.zeros(bsz, heads, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    @property
    def budget(self) -> int | None:
        return None if self.heavy is None else self.heavy + self.recent

    @property
    def stored(self) -> int:
        """Tokens kept per (sequence, head), the scratch slot excluded."""
        if not self.is_initialized:
            return 0
        return self.budget if self.slot_mode else self._num_slots()

    def _num_slots(self) -> int:
        """Slots held per (sequence, head), the scratch slot included."""
        return self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.awaiting_attention:
            raise RuntimeError(
                f"H2OCache layer {self.layer_idx}: the previous step's attention never reached h2o-cache's scoring "
                "attention, so the cache is left mid-step. If that forward raised an exception, call cache.reset() "
                "(or create a new H2OCache) before using the cache again. Otherwise the model's attention bypasses "
                "transformers' attention registry, or h2o_cache.disable() was called; H2O supports "
                "attn_implementation in ['sdpa', 'eager', 'flash_attention_2', 'flash_attention_3', "
                "'flash_attention_4']."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif (not torch.compiler.is_compiling() and self.keys.is_inference()
              and not torch.is_inference_mode_enabled()):
            # Filled under torch.inference_mode() and continued outside it (a chat loop): inference tensors
            # refuse the in-place writes of a decode step there, so continue on normal copies (once). Dynamo
            # cannot trace is_inference(); a compiled step never runs on inference tensors (compile refuses them).
            self._apply(torch.Tensor.clone)
        if self.keys.shape[:2] != key_states.shape[:2] or self.keys.shape[-1] != key_states.shape[-1]:
            self._check_shape(key_states)
        q_len = key_states.shape[-2]
        if self.heavy is None:
            from . import patches_enabled

            if not patches_enabled():  # else the whole prefill runs before the unclaimed layer is noticed
                raise RuntimeError("h2o_cache.disable() was called: call h2o_cache.enable() before using an H2OCache")
            # Every H2O layer asks (the config warns once): in a hybrid model layer 0 may be a window layer.
            self.h2o_config.warn_if_small(self.prompt_length or q_len)
            heavy, recent = self.h2o_config.layer_token_budgets(self.prompt_length or q_len, self.budget_index,
                                                                self.num_layers)
            self.heavy, self.recent = self.policy.split(heavy, recent, self.h2o_config)
            logger.debug("layer %d: budget %d heavy + %d recent", self.layer_idx, self.heavy, self.recent)

        if self.slot_mode and q_len == 1:
            s = self.budget  # the scratch slot, the last one
            self.keys[:, :, -1] = key_states[:, :, 0]
            self.values[:, :, -1] = value_states[:, :, 0]
            self.positions[:, :, s] = self.seen
            if self.scores is not None:
                self.scores[:, :, s] = 0.0
            if self.valid is not None:
                self.valid[:, :, s] = True
        else:
            if self.slot_mode:  # several new tokens: drop the scratch slot and append
                self._apply(lambda t: t[:, :, : self.budget])
                self.slot_mode = False
            bsz, heads = self.keys.shape[:2]
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            if self.scores is not None:
                self.scores = torch.cat([self.scores, self.scores.new_zeros(bsz, heads, q_len)], dim=-1)
            if self.positions is not None:
                new_pos = torch.arange(self.seen, self.seen + q_len, dtype=torch.int32,
                                       device=self.device).expand(bsz, heads, q_len)
                self.positions = torch.cat([self.positions, new_pos], dim=-1)
            if self.valid is not None:
                self.valid = torch.cat([self.valid, self.valid.new_ones(bsz, heads, q_len)], dim=-1)
        self.seen += q_len
        self.new_tokens = q_len
        self.awaiting_attention = True
        return self.keys, self.values

    def _check_shape(self, key_states: torch.Tensor) -> None:
        if self.keys.shape[0] != key_states.shape[0]:
            raise ValueError(
                f"H2OCache: batch size {key_states.shape[0]} does not match the cache's batch size "
                f"{self.keys.shape[0]}; create a new H2OCache (or call cache.reset()) for a different batch"
            )
        raise ValueError(
            f"H2OCache layer {self.layer_idx}: keys of {key_states.shape[1]} KV heads x {key_states.shape[-1]} "
            f"dims do not match the {self.keys.shape[1]} x {self.keys.shape[-1]} this cache holds: one H2OCache "
            "serves one model; create a new H2OCache (or call cache.reset()) for another model"
        )

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers < 5.3 passes the queries' cache_position (a 1-D tensor) instead of their count.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[-1]
        stored = self.stored if self.is_initialized else 0
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    # The same method's name (abstract) in transformers < 5.3.
    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        placement = self.num_layers, self.budget_index  # given by the cache, not by __init__'s arguments
        self.__init__(self.h2o_config, self.layer_idx, self.prompt_length)
        self.num_layers, self.budget_index = placement

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError(
            "H2OCache cannot be cropped: evicted tokens cannot be restored, so rollback-based decoding (assisted / "
            "speculative generation, DoLa-style rollbacks) is not supported with H2O"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            # `[indices, ...]`, as DynamicLayer: a tuple of rows must select rows, not index several dimensions.
            self._apply(lambda t: t[indices, ...])

    def offload(self) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    # ---- H2O bookkeeping -----------------------------------------------------------------------------------
    @classmethod
    def _tensor_names(cls) -> tuple[str, ...]:
        return tuple(name for names in cls._BYTE_GROUPS.values() for name in names)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply one batch/slot transform to every per-token tensor, so they never drift apart."""
        for name in self._tensor_names():
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def _materialised_positions(self) -> torch.Tensor:
        if self.positions is None:
            # Before the first eviction every token seen is stored, in order.
            bsz, heads, slots = *self.keys.shape[:2], self._num_slots()
            self.positions = torch.arange(slots, dtype=torch.int32,
                                          device=self.device).expand(bsz, heads, slots).contiguous()
        return self.positions

    def mark_new_tokens_valid(self, new_valid: torch.Tensor | None) -> None:
        """Record which of this step's tokens are real (``[B, q]`` bool); ``None`` means all of them."""
        if new_valid is None:
            return
        bsz, heads, slots = *self.keys.shape[:2], self._num_slots()
        if self.valid is None:
            self.valid = torch.ones(bsz, heads, slots, dtype=torch.bool, device=self.device)
        self.valid[:, :, slots - self.new_tokens :] = new_valid[:, None, :].to(self.device)

    def key_valid(self) -> torch.Tensor | None:
        return self.valid

    def after_attention(self, mass: torch.Tensor | None) -> None:
        """Accumulate this step's attention mass ``[B, H, slots]`` and evict down to the budget."""
        if mass is not None and self.scores is not None:
            self.scores += mass
        if self.slot_mode and self.new_tokens == 1:
            self._evict_one()
        elif self._num_slots() > self.budget:
            self._evict_to_budget()
        self.new_tokens = 0

    def _priority(self) -> torch.Tensor:
        positions = self._materialised_positions()
        prio = self.policy.priority(self.scores, positions, self.seen, self.h2o_config)
        if self.valid is not None:
            # Padding is evicted first and never chosen as a heavy hitter.
            prio = prio.masked_fill(~self.valid, -_POS_INF)
        # The newest token is always protected, even by a policy without a recent window.
        protected = positions >= self.seen - max(self.recent, 1)
        if self.valid is not None:
            # Left padding inside the recent window (a prompt shorter than it) stays evictable, so a padded row
            # keeps exactly the real tokens the same sequence would keep alone.
            protected &= self.valid
        return prio.masked_fill(protected, _POS_INF)

    def _evict_one(self) -> None:
        victim = self._priority().argmin(dim=-1, keepdim=True)  # [B, H, 1]
        s = self.budget
        # The scratch slot is cloned: scatter_ refuses a source that aliases its destination (torch detects it
        # e.g. with one KV head, MQA), and a victim may be the scratch slot itself.
        for name in ("keys", "values"):
            t = getattr(self, name)
            t.scatter_(2, victim[..., None].expand(-1, -1, 1, t.shape[-1]), t[:, :, s : s + 1].clone())
        for name in ("scores", "positions", "valid"):
            t = getattr(self, name)
            if t is not None:
                t.scatter_(2, victim, t[:, :, s : s + 1].clone())
        self.evicted += 1

    def _evict_to_budget(self) -> None:
        slots = self._num_slots()
        keep = self._priority().topk(self.budget, dim=-1).indices.sort(dim=-1).values  # [B, H, budget]
        # One spare slot at the end becomes the scratch slot of the following decode steps.
        keep = torch.cat([keep, keep[..., -1:]], dim=-1)

        def gather(t: torch.Tensor) -> torch.Tensor:
            index = keep if t.dim() == 3 else keep[..., None].expand(-1, -1, -1, t.shape[-1])
            return t.gather(2, index)

        self._apply(gather)
        self.slot_mode = True
        self.evicted += slots - self.budget

    @classmethod
    def concatenate(cls, layers: Sequence[H2OLayer]) -> H2OLayer:
        """One layer holding the sequences of ``layers`` in order (batch axis).

        The layers must be in the same state: the same tokens seen, budget and slots, i.e. prompts of one padded
        width prefilled separately (``h2o_cache.prefill_in_micro_batches``).
        """
        first = layers[0]

        def state(layer: H2OLayer) -> tuple:
            shapes = tuple(None if getattr(layer, n) is None else tuple(getattr(layer, n).shape[1:])
                           for n in layer._tensor_names() if n not in ("positions", "valid"))
            return (type(layer), layer.is_initialized, layer.awaiting_attention,
                    *(getattr(layer, n) for n in layer._STATE), shapes)

        if any(layer.h2o_config != first.h2o_config or state(layer) != state(first) for layer in layers):
            raise ValueError(
                "H2OCache.concatenate: the caches differ in budget or tokens seen; concatenate only caches of "
                "prompts with one padded width, prefilled the same way and each after a complete forward"
            )
        out = cls(first.h2o_config, first.layer_idx, first.prompt_length)
        out.num_layers, out.budget_index = first.num_layers, first.budget_index
        if not first.is_initialized:
            return out
        out.dtype, out.device, out.is_initialized = first.dtype, first.device, True
        for name in first._STATE:
            setattr(out, name, getattr(first, name))
        for name in first._tensor_names():
            if name not in ("positions", "valid") and getattr(first, name) is not None:
                setattr(out, name, torch.cat([getattr(layer, name) for layer in layers]))
        # Positions and validity exist only in layers that needed them (eviction, padding): fill in the rest.
        if any(layer.positions is not None for layer in layers):
            out.positions = torch.cat([layer._materialised_positions() for layer in layers])
        if any(layer.valid is not None for layer in layers):
            out.valid = torch.cat([layer.valid if layer.valid is not None
                                   else torch.ones(*layer.keys.shape[:2], layer._num_slots(), dtype=torch.bool,
                                                   device=layer.device)
                                   for layer in layers])
        return out

    def kv_bytes_by_kind(self) -> dict[str, int]:
        """Bytes held, by kind: ``keys``, ``values`` (codes or full precision), ``quant_params`` (scales, zero
        points) and ``bookkeeping`` (scores, positions, validity); the scratch slot included."""
        out = {}
        for kind, names in self._BYTE_GROUPS.items():
            tensors = [getattr(self, n, None) for n in names] if self.is_initialized else []
            out[kind] = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return out

    def kv_bytes(self) -> int:
        """Every byte the layer holds per stored token: keys, values, quantisation parameters, bookkeeping."""
        return sum(self.kv_bytes_by_kind().values())


def layer_class(h2o_config: H2OConfig) -> type[H2OLayer]:
    """The layer class that stores what ``h2o_config`` asks for: packed integers with ``kv_bits``."""
    if h2o_config.kv_bits is None:
        return H2OLayer
    from .quantized import QuantizedH2OLayer

    return QuantizedH2OLayer


class H2OCache(Cache):
    """Heavy-Hitter Oracle KV cache for transformers 5.

    Use it through ``generate(..., cache_implementation="h2o", cache_config={...})`` or pass it yourself::

        cache = H2OCache(model.config, heavy_budget=128, recent_budget=128)
        model.generate(ids, past_key_values=cache)

    Args:
        config: the model's config (checked for support and used to create one layer per decoder layer);
            ``None`` creates layers lazily.
        h2o_config: an ``H2OConfig``; or give its fields as keyword arguments (``heavy_ratio=0.1, ...``).
        prompt_length: the prompt's length in tokens, which ratio budgets resolve against. Needed only when the
            prompt reaches the cache in several pieces (``generate(prefill_chunk_size=...)`` or a hand-fed
            chunked prefill); by default ratios resolve against the first update's length.
    """

    def __init__(
        self,
        config: Any = None,
        h2o_config: H2OConfig | None = None,
        *,
        prompt_length: int | None = None,
        **options: Any,
    ):
        if h2o_config is not None and options:
            raise ValueError(f"H2OCache: pass either h2o_config or keyword options, not both (got {sorted(options)})")
        if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)
                                          or prompt_length < 1):
            raise ValueError(f"H2OCache: prompt_length must be an integer >= 1, got {prompt_length!r}")
        self.h2o_config = h2o_config if h2o_config is not None else H2OConfig.from_dict(options)
        self.prompt_length = prompt_length
        # (layer type, window) per decoder layer; None without a config: every layer is an H2O layer.
        self.layer_plan: list[tuple[str, int | None]] | None = None
        self.num_layers: int | None = None  # H2O layers of the model: what per-layer budgets share a total among
        if config is not None:
            from .support import check_model_config

            self.layer_plan = check_model_config(config)
            self.num_layers = sum(layer_type == FULL_ATTENTION for layer_type, _ in self.layer_plan)
            if all(layer_type != FULL_ATTENTION for layer_type, _ in self.layer_plan):
                logger.warning(
                    "H2OCache: %s has no full-attention layer (every layer is %s), so H2O compresses nothing: the "
                    "window already bounds the cache. Set config.sliding_window = None to use H2O instead of the "
                    "window (the model then attends beyond its window, as it was not trained to).",
                    type(config).__name__, self.layer_plan[0][0],
                )
            super().__init__(layers=[self._new_layer(i) for i in range(len(self.layer_plan))])
        else:
            super().__init__(layer_class_to_replicate=H2OLayer)

    def layer_type(self, layer_idx: int) -> str:
        """``"full_attention"`` (an H2O layer) or the window type transformers gives layer ``layer_idx``."""
        if self.layer_plan is None or layer_idx >= len(self.layer_plan):
            return FULL_ATTENTION
        return self.layer_plan[layer_idx][0]

    def _new_layer(self, layer_idx: int) -> CacheLayerMixin:
        """The cache layer of decoder layer ``layer_idx``: the one place that maps a layer type to its class.

        Full-attention layers are H2O layers; sliding-window and chunked layers keep transformers' own
        sliding-window layer (its ``DYNAMIC_LAYER_TYPE_MAPPING`` uses the same class for both: only the mask
        differs), sized by the config's window.
        """
        if self.layer_type(layer_idx) == FULL_ATTENTION:
            layer = layer_class(self.h2o_config)(self.h2o_config, layer_idx, self.prompt_length)
            layer.num_layers = self.num_layers
            if self.layer_plan is not None:  # per-layer budgets rank the H2O layers only
                layer.budget_index = sum(t == FULL_ATTENTION for t, _ in self.layer_plan[:layer_idx])
            return layer
        return DynamicSlidingWindowLayer(sliding_window=self.layer_plan[layer_idx][1])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if isinstance(layer, H2OLayer):  # a window layer's attention stays the backend's own
            _PENDING.layer = layer
        return keys, values

    def reset(self) -> None:
        # Fresh layers rather than each layer's own reset: transformers' window layers reset differently across
        # releases (zeroed in place in some, dropped in others).
        self.layers = [self._new_layer(i) for i in range(len(self.layers))]

    @classmethod
    def concatenate(cls, caches: Sequence[H2OCache], *, release: bool = False) -> H2OCache:
        """One cache holding the sequences of ``caches`` in order (batch axis); see ``H2OLayer.concatenate``.

        ``release=True`` empties each source layer once it is copied, so joining costs one layer of extra memory
        instead of a second copy of every cache (the sources are left empty).
        """
        if not caches:
            raise ValueError("H2OCache.concatenate: caches is empty")
        first = caches[0]
        if any(c.h2o_config != first.h2o_config or len(c.layers) != len(first.layers) for c in caches):
            raise ValueError("H2OCache.concatenate: the caches differ in H2OConfig or number of layers")
        if any(c.layer_plan != first.layer_plan for c in caches):
            raise ValueError("H2OCache.concatenate: the caches were built for models with different layer types")
        out = cls(None, first.h2o_config, prompt_length=first.prompt_length)
        out.layer_plan = first.layer_plan
        out.layers = []
        for i in range(len(first.layers)):
            layers = [c.layers[i] for c in caches]
            if isinstance(layers[0], H2OLayer):
                out.layers.append(type(layers[0]).concatenate(layers))
            else:
                out.layers.append(_concatenate_window_layers(layers))
            if release:
                for c in caches:
                    c.layers[i] = c._new_layer(i)
        return out

    # ---- reporting ------------------------------------------------------------------------------------------
    def _h2o_layers(self) -> list[H2OLayer]:
        return [layer for layer in self.layers if isinstance(layer, H2OLayer)]

    def kv_bytes(self) -> int:
        """Every byte all layers hold for their tokens (``H2OLayer.kv_bytes``; window layers: keys and values)."""
        return sum(layer_kv_bytes(layer) for layer in self.layers)

    def kv_bytes_by_type(self) -> dict[str, int]:
        """``kv_bytes()`` split by layer type (``"full_attention"`` = the H2O layers, ``"sliding_attention"``...)."""
        out: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            out[self.layer_type(i)] = out.get(self.layer_type(i), 0) + layer_kv_bytes(layer)
        return out

    def kv_bytes_by_kind(self) -> dict[str, int]:
        """``layer_bytes_by_kind`` summed over the layers."""
        out = dict.fromkeys(H2OLayer._BYTE_GROUPS, 0)
        for layer in self.layers:
            for kind, n in layer_bytes_by_kind(layer).items():
                out[kind] += n
        return out

    def tokens_kept(self) -> int:
        """Tokens stored per (sequence, KV head) in the first H2O layer (all H2O layers keep the same count); in a
        cache without H2O layers, in the first layer."""
        h2o = self._h2o_layers()
        if h2o:
            return h2o[0].stored
        layer = self.layers[0] if self.layers else None
        return layer.keys.shape[-2] if layer is not None and layer.is_initialized else 0

    def budget(self) -> int | None:
        """The H2O layers' budget in tokens per (sequence, KV head), fixed at prefill; ``None`` before it, for the
        ``keep_all`` policy (no budget) and without H2O layers (window layers keep their window)."""
        h2o = self._h2o_layers()
        return h2o[0].budget if h2o and self.h2o_config.policy != "keep_all" else None

    def stats(self) -> dict[str, Any]:
        h2o = self._h2o_layers()
        layer = h2o[0] if h2o and self.h2o_config.policy != "keep_all" else None
        types: dict[str, int] = {}
        for i in range(len(self.layers)):
            types[self.layer_type(i)] = types.get(self.layer_type(i), 0) + 1
        return {
            "policy": self.h2o_config.policy,
            "tokens_seen": self.get_seq_length(),
            "tokens_kept": self.tokens_kept(),
            "heavy": None if layer is None else layer.heavy,
            "recent": None if layer is None else layer.recent,
            "kv_bits": self.h2o_config.kv_bits,
            "kv_bytes": self.kv_bytes(),
            "bytes": self.kv_bytes_by_kind(),
            "layer_types": types,
            "kv_bytes_by_type": self.kv_bytes_by_type(),
        }


def layer_bytes_by_kind(layer: Any) -> dict[str, int]:
    """Bytes a cache layer holds, by kind (``H2OLayer.kv_bytes_by_kind``); a transformers window layer holds
    full-precision keys and values only."""
    if isinstance(layer, H2OLayer):
        return layer.kv_bytes_by_kind()
    out = dict.fromkeys(H2OLayer._BYTE_GROUPS, 0)
    if getattr(layer, "is_initialized", False) and layer.keys is not None:
        out["keys"] = layer.keys.numel() * layer.keys.element_size()
        out["values"] = layer.values.numel() * layer.values.element_size()
    return out


def layer_kv_bytes(layer: Any) -> int:
    """Every byte a cache layer holds (see ``layer_bytes_by_kind``)."""
    return sum(layer_bytes_by_kind(layer).values())


def _concatenate_window_layers(layers: Sequence[CacheLayerMixin]) -> CacheLayerMixin:
    """One transformers window layer holding the sequences of ``layers`` (same tokens seen) in order."""
    first = layers[0]
    if any(type(layer) is not type(first) or layer.is_initialized != first.is_initialized
           or layer.get_seq_length() != first.get_seq_length()
           or (layer.is_initialized and layer.keys.shape[1:] != first.keys.shape[1:]) for layer in layers):
        raise ValueError(
            "H2OCache.concatenate: the caches differ in tokens seen; concatenate only caches of prompts with one "
            "padded width, prefilled the same way and each after a complete forward"
        )
    out = copy.copy(first)  # the window and the count of tokens seen, whatever this transformers calls them
    if first.is_initialized:
        out.keys = torch.cat([layer.keys for layer in layers])
        out.values = torch.cat([layer.values for layer in layers])
    return out
