"""``H2OLM``: lm-eval's ``HFLM`` with the KV cache compressed by a policy of ``H2OCache`` (or the full cache).

lm-eval scores loglikelihood / multiple-choice requests with ONE forward over context + continuation and no cache,
so no eviction could ever happen. ``H2OLM`` scores them the way a compressed cache would see them instead:

1. prefill ``context[:-1]`` through the cache (it evicts down to the budget at the end of the prefill);
2. feed ``context[-1]`` and then the continuation ONE TOKEN AT A TIME; each step's logits score the next token.

Every scored token is therefore predicted through the compressed cache (decode-time eviction included). Requests
that share a context (the choices of a multiple-choice item) share one prefill: the cache is deep-copied per
continuation. The budget is a fraction of ``len(context) + len(longest continuation)``, i.e. of every token the
model sees for the item, so at 100% nothing is evicted and the scores equal plain HFLM's (tested).

``generate_until`` requests go through ``model.generate`` with the policy's cache (``policy="full"``: a
``DynamicCache``, as HFLM's own path makes) and a budget that is a fraction of the prompt length.

The wrapper does not care which task it serves: the project's local tasks (``eval/tasks``) and standard lm-eval
tasks run the same way; standard tasks need their datasets available locally (see docs/benchmarks/quality.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from h2o_cache.compat import cache_kwargs
from h2o_cache.config import H2OConfig
from h2o_cache.runner import fp16_kv_bytes, kv_bytes

from .caches import ALL_POLICIES, FULL, check_budgets, make_cache
from .lm_eval_tasks import LOCAL_TASKS, TASK_DIR

logger = logging.getLogger(__name__)


class H2OLM(HFLM):
    """``HFLM`` whose every request runs through a compressed KV cache (see the module docstring).

    Args:
        pretrained / tokenizer: a loaded causal LM and its tokenizer (always pass the tokenizer).
        policy: ``full`` or an ``H2OCache`` policy.
        budget: total KV budget as a fraction in (0, 1].
        h2o_options: extra ``H2OConfig`` fields (``gqa_aggregation``, ``score_normalization``, ...).
        **kwargs: passed to ``HFLM`` (``batch_size`` applies to ``policy="full"`` and to generation).
    """

    def __init__(self, pretrained: Any, tokenizer: Any, *, policy: str = "h2o", budget: float = 0.2,
                 h2o_options: dict[str, Any] | None = None, **kwargs: Any):
        if policy not in ALL_POLICIES:
            raise ValueError(f"policy={policy!r} is not supported; choose one of {list(ALL_POLICIES)}")
        check_budgets([budget])
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.policy, self.budget, self.h2o_options = policy, float(budget), dict(h2o_options or {})
        # Bytes the caches held at the end of each scored continuation or generation, and what an uncompressed
        # fp16 cache would have held for the same tokens (the byte share of ``h2o-cache eval --frontier``).
        self.kv_usage = {"kv_bytes": 0, "fp16_bytes": 0}

    # ---- loglikelihood / multiple choice ------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.policy == FULL:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # Group by context so the choices of one item share a prefill (and the same budget).
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context_enc, _) in enumerate(requests):
            groups.setdefault(tuple(context_enc), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc=f"loglikelihood ({self.policy}@{self.budget:.0%})")
        for context, indices in groups.items():
            continuations = [list(requests[i][2]) for i in indices]
            for i, answer in zip(indices, self._score_group(list(context), continuations), strict=True):
                results[i] = answer
                request_str = requests[i][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return results

    @torch.inference_mode()
    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        longest = max(len(c) for c in continuations)
        if longest > self.max_length:
            raise ValueError(f"a continuation of {longest} tokens exceeds max_length={self.max_length}")
        # Same left truncation as HFLM: the model sees at most max_length tokens.
        context = context[-(self.max_length + 1 - longest):]
        cache, _ = make_cache(self.policy, self.model, self.budget, len(context) + longest, **self.h2o_options)
        if len(context) > 1:
            self.model(input_ids=torch.tensor([context[:-1]], device=self.device), **cache_kwargs(cache),
                       use_cache=True, logits_to_keep=1)
        answers = []
        for n, cont in enumerate(continuations):
            # The last continuation may consume the prefilled cache itself.
            step_cache = cache if n == len(continuations) - 1 else copy.deepcopy(cache)
            feed = [context[-1]] + cont[:-1]
            logprob, greedy = 0.0, True
            for token, target in zip(feed, cont, strict=True):
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), **cache_kwargs(step_cache),
                                 use_cache=True)
                logprobs = torch.log_softmax(out.logits[0, -1].to(self.softmax_dtype), dim=-1)
                logprob += float(logprobs[target])
                greedy = greedy and int(logprobs.argmax()) == target
            answers.append((logprob, greedy))
            self._count_bytes(step_cache)
        return answers

    # ---- generate_until -------------------------------------------------------------------------------------------
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        # The cache is made here, not by ``cache_implementation``, so that its bytes can be counted afterwards.
        options = self.h2o_options if self.policy != FULL else {}
        cache, _ = make_cache(self.policy, self.model, self.budget, context.shape[1], **options)
        out = super()._model_generate(context, max_length, stop, **cache_kwargs(cache), **generation_kwargs)
        self._count_bytes(cache, context.shape[0])
        return out

    def _count_bytes(self, cache: Any, batch: int = 1) -> None:
        self.kv_usage["kv_bytes"] += kv_bytes(cache)
        self.kv_usage["fp16_bytes"] += fp16_kv_bytes(self.model.config, cache.get_seq_length(), batch)


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None = None, include_defaults: bool = True) -> Any:
    """A ``TaskManager`` that knows the project's local tasks, those in ``include_path`` (e.g. standard tasks made
    local by ``localize_standard_task``) and, with ``include_defaults``, lm-eval's own (indexing those takes tens
    of seconds on 2 cores: cached)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASK_DIR), *([include_path] if include_path else [])],
                       include_defaults=include_defaults)


def _needs_lm_eval_tasks(tasks: Sequence[str], include_path: str | None) -> bool:
    """Whether some task is neither one of the project's nor a YAML in ``include_path``."""
    local = set(LOCAL_TASKS) | ({p.stem for p in Path(include_path).glob("*.yaml")} if include_path else set())
    return any(task not in local for task in tasks)


def _flatten(results: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` from ``simple_evaluate``'s results, stderr and aliases dropped."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "stderr" in key or key == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}[{filt}]"
            flat[f"{task}/{name}"] = float(value)
    return flat


def run_lm_eval(model: Any, tokenizer: Any, *, tasks: Sequence[str] | None = None, policy: str = "h2o",
                budget: float = 0.2, limit: int | float | None = None, h2o_options: dict[str, Any] | None = None,
                include_path: str | None = None, batch_size: int = 1, raw: bool = False,
                kv_usage: dict[str, int] | None = None) -> Any:
    """``lm_eval.simple_evaluate`` through ``H2OLM``; returns ``{"task/metric": value}`` (or the raw results).
    A ``kv_usage`` dict receives ``H2OLM.kv_usage`` (bytes held by the compressed caches of the loglikelihood
    requests, and their fp16 reference)."""
    import lm_eval

    lm = H2OLM(pretrained=model, tokenizer=tokenizer, policy=policy, budget=budget, h2o_options=h2o_options,
               batch_size=batch_size)
    tasks = list(tasks or LOCAL_TASKS)
    manager = task_manager(include_path, _needs_lm_eval_tasks(tasks, include_path))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                  limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    if kv_usage is not None:
        kv_usage.update(lm.kv_usage)
    return out if raw else _flatten(out)


# Every H2OConfig option but the budget (given as budget= or heavy_ratio/recent_ratio) and policy, e.g. kv_bits.
_H2O_FIELDS = {f.name for f in dataclasses.fields(H2OConfig)} - {
    "heavy_ratio", "recent_ratio", "heavy_budget", "recent_budget", "policy"}


def h2o_lm_from_args(args: str | dict[str, Any], additional_config: dict | None = None) -> H2OLM:
    """``H2OLM`` from lm-eval's ``--model_args``: ``pretrained=DIR`` (a model folder or a .gguf file), optional
    ``tokenizer``, ``policy`` (``full`` = the uncompressed cache), the budget as ``budget=0.2`` or as
    ``heavy_ratio=0.1,recent_ratio=0.1`` (their sum; split half/half), the other ``H2OConfig`` fields flat, and
    any ``HFLM`` argument."""
    from lm_eval import utils

    from h2o_cache.models import load_model

    args = {**(utils.simple_parse_args_string(args) if isinstance(args, str) else args),
            **{k: v for k, v in (additional_config or {}).items() if v is not None}}
    if "pretrained" not in args:
        raise ValueError("--model_args: pretrained=DIR (a model folder or a .gguf file) is required")
    ratios = [args.pop(k) for k in ("heavy_ratio", "recent_ratio") if k in args]
    if ratios and "budget" in args:
        raise ValueError("--model_args: give budget or heavy_ratio/recent_ratio, not both")
    budget = float(sum(ratios)) if ratios else float(args.pop("budget", 0.2))
    h2o_options = {k: args.pop(k) for k in list(args) if k in _H2O_FIELDS}
    tokenizer = args.pop("tokenizer", None)
    dtype = args.pop("dtype", "float32")
    device = args.pop("device", None)
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
    model, own_tokenizer = load_model(str(args.pop("pretrained")), dtype=str(dtype).replace("torch.", ""),
                                      device=device)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        own_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return H2OLM(pretrained=model, tokenizer=own_tokenizer, policy=str(args.pop("policy", "h2o")), budget=budget,
                 h2o_options=h2o_options, **args)


def register() -> None:
    """Register ``h2o`` in lm-eval's model registry (``simple_evaluate(model="h2o", model_args=...)``,
    ``lm_eval --model h2o``); idempotent."""
    from lm_eval.api import registry

    if "h2o" in registry.MODEL_REGISTRY:
        return

    class RegisteredH2OLM(H2OLM):
        create_from_arg_string = staticmethod(h2o_lm_from_args)
        create_from_arg_obj = staticmethod(h2o_lm_from_args)

    registry.register_model("h2o")(RegisteredH2OLM)
