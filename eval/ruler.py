"""RULER's synthetic long-context tasks through lm-eval with a policy's KV cache: ``h2o-cache ruler``.

Thin on purpose: the tasks, their samples and their scoring are lm-eval's own (``lm_eval/tasks/ruler``, built
by lm-eval's ``TaskManager`` and run by ``simple_evaluate``); the model is ``H2OLM``, the ``h2o`` lm-eval model.
This module only runs them cell by cell -- a cell is (task, length, policy, budget, cache options) -- and keeps
every finished sample's score in a JSON file, so a long run can stop and go on (``resume``) without recomputing
what is done, and a cell can grow from 50 to 100 samples by evaluating the 50 new ones only.

Samples are reproducible: lm-eval seeds ``random``, numpy and torch before it builds a task, and RULER's
generators draw from that state; each task is built alone, after the same seeding, as ``lm_eval --tasks TASK``
builds it. (``ruler_cwe`` also draws from a generator of its module: in one process, its samples at a second
length depend on the first.) Every stored sample keeps a hash of its prompt, compared when a run resumes or merges.

RULER sizes its samples with a tokenizer loaded from a folder (``tokenizer`` in lm-eval's task metadata): the
model's own, by default the folder it was loaded from.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from tqdm.auto import tqdm

from h2o_cache.config import H2OConfig
from h2o_cache.files import check_output

from .caches import ALL_POLICIES, FULL, check_budgets, check_policies, configurations, h2o_config
from .report import line_plot, markdown_table, write_json, write_text

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'h2o-cache[ruler]'"
# The synthetic tasks whose samples lm-eval generates with no download (checked with lm-eval 0.4.13).
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# The other RULER tasks and what they fetch from the hub (unreachable here: they fail after lm-eval's retries).
HUB_TASKS = {
    **{t: "the essay haystack (dataset baber/paul_graham_essays)" for t in (
        "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")},
    "ruler_qa_squad": "SQuAD v2 (from rajpurkar.github.io)",
    "ruler_qa_hotpot": "HotpotQA (dataset namlh2004/hotpotqa)",
}
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")
DEFAULT_LENGTHS = (4096, 8192)
DEFAULT_POLICIES = ("full", "h2o", "streaming", "local", "random")
DEFAULT_BUDGETS = (0.1, 0.2, 0.5)
# lm-eval's own defaults: ``simple_evaluate`` seeds ``random`` with the first, numpy and torch with the second,
# before it builds tasks (lm_eval.defaults).
DATA_SEED, OTHER_SEED = 0, 1234
FORMAT = 1
# Per cell, summed over its generations: the bytes its caches held at the end (``h2o_cache.runner.kv_bytes``) and
# what an fp16 cache of the same tokens holds; their ratio is the byte axis of ``h2o-cache eval --frontier``.
BYTE_SUMS = ("kv_bytes", "fp16_bytes")
KV_COLUMN = "KV bytes"


def require_ruler() -> None:
    """Raise ``ImportError`` naming the extra when lm-eval or RULER's generators (wonderwords, nltk) are missing."""
    missing = [m for m in ("lm_eval", "wonderwords", "nltk") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"RULER needs {', '.join(missing)}: {INSTALL_HINT}")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One figure of the table: ``task`` at ``length`` tokens under ``policy`` at ``budget`` (with ``options``)."""

    task: str
    length: int
    policy: str
    budget: float
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        parts = [self.task, str(self.length), self.policy, format(self.budget, "g")]
        return "|".join(parts + [",".join(f"{k}={v}" for k, v in self.options)] * bool(self.options))


def make_cells(tasks: Sequence[str], lengths: Sequence[int], policies: Sequence[str], budgets: Sequence[float],
               options: dict[str, Any] | None = None) -> list[Cell]:
    """Every cell, length-major, then configuration (``full`` once, at budget 1), then task. ``options`` apply to
    the compressed policies only: the full cache is the same cell with or without them."""
    opts = tuple(sorted((options or {}).items()))
    return [Cell(task, length, policy, budget, () if policy == FULL else opts)
            for length in lengths for policy, budget in configurations(policies, budgets) for task in tasks]


def parse_cache_options(items: Sequence[str]) -> dict[str, Any]:
    """``["kv_bits=4", ...]`` -> ``{"kv_bits": 4}``, each KEY an ``H2OConfig`` field (checked by building one)."""
    fields = {f.name for f in dataclasses.fields(H2OConfig)}
    reserved = {"heavy_ratio", "recent_ratio", "heavy_budget", "recent_budget", "policy", "seed"}
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or key not in fields - reserved:
            raise ValueError(f"--cache-option expects KEY=VALUE with KEY among {sorted(fields - reserved)}, "
                             f"got {item!r}")
        options[key] = _value(text.strip())
    try:
        h2o_config(0.2, 100, "h2o", **options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--cache-option: {err}") from None
    return options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def check_tasks(tasks: Sequence[str]) -> list[str]:
    known = (*OFFLINE_TASKS, *HUB_TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ValueError(f"tasks: {unknown or 'empty'} not RULER tasks; choose from {list(known)} (offline: "
                         f"{list(OFFLINE_TASKS)})")
    for task in tasks:
        if task in HUB_TASKS:
            logger.warning("%s needs %s from the network; it fails where that cannot be reached", task,
                           HUB_TASKS[task])
    return list(dict.fromkeys(tasks))


def check_lengths(lengths: Sequence[int]) -> list[int]:
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 256]
    if bad or not lengths:
        raise ValueError(f"lengths: every length must be an integer >= 256 tokens, got {list(lengths)}")
    return list(dict.fromkeys(lengths))


def tokenizer_folder(tokenizer: Any, folder: str | os.PathLike | None = None) -> str:
    """The folder RULER loads its sizing tokenizer from: ``folder``, else the one ``tokenizer`` came from."""
    path = Path(folder if folder is not None else getattr(tokenizer, "name_or_path", "") or "")
    if not str(path) or not path.is_dir():
        raise ValueError(f"tokenizer: RULER sizes its samples with a tokenizer loaded from a folder; "
                         f"{str(path) or 'this tokenizer'!r} is not one: pass the model's tokenizer folder "
                         f"(--tokenizer DIR)")
    return str(path)


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Refuse a second run writing the same results file at the same time (it would drop the other's cells)."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--output {str(path)!r}: another run is writing it now; wait for it or choose "
                             "another file") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Tasks:
    """lm-eval's RULER tasks, each built once per length and reused by every cell (building one generates its 500
    samples: seconds)."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir, self._managers, self._tasks = tokenizer_dir, {}, {}

    def manager(self, length: int) -> Any:
        """A ``TaskManager`` of RULER's folder only (lm-eval's whole task tree takes tens of seconds to index, and
        ``simple_evaluate`` indexes it again on every call that is given no manager)."""
        if length not in self._managers:
            from lm_eval.tasks import TaskManager

            ruler_dir = Path(importlib.util.find_spec("lm_eval.tasks").origin).parent / "ruler"
            self._managers[length] = TaskManager(
                include_path=str(ruler_dir), include_defaults=False,
                metadata={"max_seq_lengths": [length], "tokenizer": self.tokenizer_dir})
        return self._managers[length]

    def get(self, name: str, length: int) -> Any:
        if (name, length) not in self._tasks:
            manager = self.manager(length)
            # What simple_evaluate does right before it builds a task (ruler_vt draws from numpy's generator).
            random.seed(DATA_SEED)
            numpy.random.seed(OTHER_SEED)
            torch.manual_seed(OTHER_SEED)
            try:
                self._tasks[name, length] = manager.load([name])["tasks"][name]
            except Exception as err:
                if name in HUB_TASKS:
                    raise ValueError(f"{name} needs {HUB_TASKS[name]}, which cannot be reached here "
                                     f"({type(err).__name__}); the offline tasks: {list(OFFLINE_TASKS)}") from err
                raise
        return self._tasks[name, length]


def _new_results(settings: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": "RULER (lm-eval synthetic tasks)", "format": FORMAT, "settings": settings,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "created": _now(), "updated": None, "commands": [], "cells": {}}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def check_results_file(path: str | os.PathLike, resume: bool, force: bool) -> Path:
    """Check, before any work, that the results file may be written: a file that exists is only continued
    (``resume``) or started over (``force``) when asked."""
    if resume and force:
        raise ValueError("--resume continues --output and --force starts it over: give one of them")
    if Path(path).is_file() and not (resume or force):
        raise ValueError(f"--output {str(path)!r} already exists; pass --resume to continue it or --force to "
                         "start it over")
    return check_output(path, option="--output", force=True)


def _open_results(path: Path, settings: dict[str, Any], resume: bool, force: bool) -> dict[str, Any]:
    check_results_file(path, resume, force)
    if not (resume and path.exists()):
        return _new_results(settings)
    try:
        results = json.loads(path.read_text())
        cells, old = results["cells"], results["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: {str(path)!r} is not a RULER results file ({err})") from None
    if not isinstance(cells, dict) or results.get("format") != FORMAT:
        raise ValueError(f"--resume: {str(path)!r} is not a RULER results file of format {FORMAT}")
    differ = [f"{k}={old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    if differ:
        raise ValueError(f"--resume: {str(path)!r} was made with other settings ({'; '.join(differ)}); its cells "
                         "would not compare: choose another --output")
    return results


def run_ruler(model: Any, tokenizer: Any, *, output: str | os.PathLike, tasks: Sequence[str] = DEFAULT_TASKS,
              lengths: Sequence[int] = (4096,), policies: Sequence[str] = DEFAULT_POLICIES,
              budgets: Sequence[float] = DEFAULT_BUDGETS, limit: int = 50,
              cache_options: dict[str, Any] | None = None, tokenizer_dir: str | os.PathLike | None = None,
              batch_size: int = 1, seed: int = 0, chunk: int = 10, resume: bool = False, force: bool = False,
              model_name: str | None = None, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every cell's first ``limit`` samples that ``output`` does not hold yet; returns the results.

    ``output`` (a JSON file) is rewritten after every ``chunk`` samples, so an interrupted run loses at most one
    chunk. It must not exist unless ``resume`` (continue it: same model, dtype, seed, batch size and lm-eval) or
    ``force`` (start it over). ``cache_options`` are extra ``H2OConfig`` fields for the compressed policies;
    ``seed`` seeds the ``random`` policy.
    """
    require_ruler()
    import lm_eval

    from .lm_eval_model import H2OLM

    tasks, lengths = check_tasks(tasks), check_lengths(lengths)
    policies, budgets = check_policies(policies), check_budgets(budgets)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: samples per cell must be an integer >= 1, got {limit!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cache_options = dict(cache_options or {})
    if cache_options:
        parse_cache_options([f"{k}={v}" for k, v in cache_options.items()])
    tokenizer_dir = tokenizer_folder(tokenizer, tokenizer_dir)
    path = Path(output)
    settings = {"model": model_name or str(getattr(model, "name_or_path", type(model).__name__)),
                "dtype": str(model.dtype).replace("torch.", ""), "seed": seed, "batch_size": batch_size,
                "lm_eval": lm_eval.__version__}
    check_results_file(path, resume, force)  # before the lock file goes next to it
    with _exclusive(path):
        results = _open_results(path, settings, resume, force)
        results["commands"].append(command or "run_ruler")
        cells = make_cells(tasks, lengths, policies, budgets, cache_options)
        built = _Tasks(tokenizer_dir)
        todo = {}
        for cell in cells:
            entry = results["cells"].setdefault(cell.key, {
                "task": cell.task, "length": cell.length, "policy": cell.policy, "budget": cell.budget,
                "options": dict(cell.options), "seconds": 0.0, "samples": {}})
            docs = built.get(cell.task, cell.length).eval_docs
            if limit > len(docs):
                logger.warning("%s at %d tokens has %d samples; --limit %d runs them all", cell.task, cell.length,
                               len(docs), limit)
            for doc_id, sample in entry["samples"].items():
                if sample["input_sha1"] != _sha(docs[int(doc_id)]["input"]):
                    raise ValueError(f"--resume: sample {doc_id} of {cell.key} in {str(path)!r} differs from the "
                                     "one lm-eval generates now (another tokenizer or lm-eval?): choose another "
                                     "--output")
                if "depth" not in sample and (depth := needle_depth(docs[int(doc_id)])) is not None:
                    sample["depth"] = depth  # samples stored before depths were
            todo[cell] = [i for i in range(min(limit, len(docs))) if str(i) not in entry["samples"]]
        write_json(path, results)
        bar = tqdm(total=sum(map(len, todo.values())), desc="RULER samples", disable=not progress)
        for cell, missing in todo.items():
            if not missing:
                continue
            entry = results["cells"][cell.key]
            bar.set_postfix_str(cell.key)
            task = built.get(cell.task, cell.length)
            lm = H2OLM(pretrained=model, tokenizer=tokenizer, policy=cell.policy, budget=cell.budget,
                       h2o_options={**dict(cell.options), "seed": seed} if cell.policy != FULL else None,
                       batch_size=batch_size)
            for start in range(0, len(missing), chunk):
                ids = missing[start:start + chunk]
                began = time.perf_counter()
                held = dict(lm.kv_usage)
                out = lm_eval.simple_evaluate(model=lm, tasks=[task], samples={cell.task: ids}, bootstrap_iters=0,
                                              log_samples=True, random_seed=DATA_SEED,
                                              task_manager=built.manager(cell.length))
                entry["seconds"] += time.perf_counter() - began
                for name in BYTE_SUMS:
                    entry[name] = entry.get(name, 0) + lm.kv_usage[name] - held[name]
                for sample in out["samples"][cell.task]:
                    response = sample["filtered_resps"][0]
                    stored = entry["samples"][str(sample["doc_id"])] = {
                        "score": float(sample[str(cell.length)]), "input_sha1": _sha(sample["doc"]["input"]),
                        "response": response if isinstance(response, str) else str(response)}
                    if (depth := needle_depth(sample["doc"])) is not None:
                        stored["depth"] = depth
                entry["samples"] = dict(sorted(entry["samples"].items(), key=lambda kv: int(kv[0])))
                results["updated"] = _now()
                write_json(path, results)
                bar.update(len(ids))
        bar.close()
    return results


def merge_results(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """One results dict from several files made with the same settings (a run split across processes, each
    writing its own file): the union of their cells' samples. A sample found twice must be the same prompt."""
    merged: dict[str, Any] | None = None
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
            cells, settings = results["cells"], results["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--merge: {str(path)!r} is not a RULER results file ({err})") from None
        if merged is None:
            merged = {**results, "cells": {}, "commands": []}
        elif settings != merged["settings"]:
            raise ValueError(f"--merge: {str(path)!r} was made with other settings ({settings}) than "
                             f"{str(paths[0])!r} ({merged['settings']}); its cells would not compare")
        merged["commands"] += results.get("commands", [])
        merged["updated"] = max(filter(None, [merged.get("updated"), results.get("updated")]), default=None)
        for key, entry in cells.items():
            into = merged["cells"].setdefault(key, {**entry, "samples": {}, "seconds": 0.0,
                                                    **dict.fromkeys(BYTE_SUMS, 0)})
            new = [d for d in entry["samples"] if d not in into["samples"]]
            # A sample in two files (one copied from the other) counts its time (and bytes) once.
            share = len(new) / max(1, len(entry["samples"]))
            into["seconds"] += entry.get("seconds", 0.0) * share
            for name in BYTE_SUMS:
                into[name] += round(entry.get(name, 0) * share)
            for doc_id, sample in entry["samples"].items():
                if into["samples"].setdefault(doc_id, sample)["input_sha1"] != sample["input_sha1"]:
                    raise ValueError(f"--merge: sample {doc_id} of {key} differs between the files (another "
                                     "tokenizer or lm-eval?)")
            into["samples"] = dict(sorted(into["samples"].items(), key=lambda kv: int(kv[0])))
    if merged is None:
        raise ValueError("--merge: give at least one results file")
    return merged


# ---- report -------------------------------------------------------------------------------------------------------
def needle_depth(doc: dict[str, Any]) -> float | None:
    """Where a needle task hid its (first) answer: the fraction of the prompt's characters before it; None for the
    tasks with no one place (variable tracking, word counts), whose prompts hold no "special magic" needle."""
    answers, text = doc.get("outputs") or [], doc.get("input", "")
    where = text.find(str(answers[0])) if answers and "special magic" in text else -1
    return round(where / len(text), 4) if where >= 0 else None


DEPTH_BINS = 10


def depth_summary(results: dict[str, Any]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """Per (length, task) with needle depths, one row per configuration: the mean score of the samples whose needle
    lies in each tenth of the prompt, ``"mean (n)"`` (the NIAH view: which depths a cache still retrieves)."""
    tables: dict[tuple[int, str], dict[tuple[str, float], dict[str, Any]]] = {}
    for entry in results["cells"].values():
        depths = [(s["depth"], s["score"]) for s in entry["samples"].values() if "depth" in s]
        if not depths:
            continue
        label = _label(entry)
        row = tables.setdefault((entry["length"], entry["task"]), {}).setdefault(
            (label, entry["budget"]), {"configuration": label, "budget": f"{entry['budget']:.0%}"})
        bins: dict[int, list[float]] = {}
        for depth, score in depths:
            bins.setdefault(min(int(depth * DEPTH_BINS), DEPTH_BINS - 1), []).append(score)
        for b, scores in bins.items():
            row[_depth_column(b)] = f"{sum(scores) / len(scores):.2f} ({len(scores)})"
    return _ordered(tables)


def _ordered(tables: dict[Any, dict[tuple[str, float], dict[str, Any]]]) -> dict[Any, list[dict[str, Any]]]:
    """Each table's rows in policy order (full first), then by options and budget; the tables by key."""
    order = {p: i for i, p in enumerate(ALL_POLICIES)}
    return {where: [rows[k] for k in sorted(rows, key=lambda k: (order.get(k[0].split("[")[0], 99), k[0], k[1]))]
            for where, rows in sorted(tables.items())}


def _depth_column(b: int) -> str:
    return f"{b * 100 // DEPTH_BINS}-{(b + 1) * 100 // DEPTH_BINS}%"


def cell_stats(entry: dict[str, Any]) -> tuple[float | None, float | None, int]:
    """(mean score, standard error of the mean, samples) of a cell; the error is s / sqrt(n), None below 2."""
    scores = [s["score"] for s in entry["samples"].values()]
    n = len(scores)
    if n == 0:
        return None, None, 0
    mean = sum(scores) / n
    if n < 2:
        return mean, None, n
    var = sum((x - mean) ** 2 for x in scores) / (n - 1)
    return mean, math.sqrt(var / n), n


def _label(entry: dict[str, Any]) -> str:
    if entry["policy"] == FULL:
        return FULL
    opts = ",".join(f"{k}={v}" for k, v in entry.get("options", {}).items())
    return entry["policy"] + (f"[{opts}]" if opts else "")


def summary(results: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Per length, one row per configuration (policy, budget, options): ``{task: "mean ± stderr (n)"}``, and the
    bytes its caches held as a share of an fp16 cache of the same tokens (over the samples that counted them)."""
    tables: dict[int, dict[tuple[str, float], dict[str, Any]]] = {}
    held: dict[tuple[int, str, float], list[int]] = {}
    for entry in results["cells"].values():
        mean, err, n = cell_stats(entry)
        if n == 0:
            continue
        label = _label(entry)
        row = tables.setdefault(entry["length"], {}).setdefault(
            (label, entry["budget"]), {"configuration": label, "budget": f"{entry['budget']:.0%}"})
        row[entry["task"]] = f"{mean:.3f}" + (f" ± {err:.3f}" if err is not None else "") + f" ({n})"
        sums = held.setdefault((entry["length"], label, entry["budget"]), [0, 0])
        for i, name in enumerate(BYTE_SUMS):
            sums[i] += entry.get(name, 0)
    for (length, label, budget), (kv, fp16) in held.items():
        tables[length][label, budget][KV_COLUMN] = f"{kv / fp16:.1%}" if fp16 else "-"
    return _ordered(tables)


def report_markdown(results: dict[str, Any]) -> str:
    tasks = list(dict.fromkeys(e["task"] for e in results["cells"].values()))
    s = results["settings"]
    lines = [f"# RULER through lm-eval {s['lm_eval']}: {s['model']} ({s['dtype']})", "",
             "Each cell: mean score ± standard error of the mean (samples). Budget: KV slots as a fraction of the "
             f"prompt length (full: the uncompressed cache). {KV_COLUMN}: what the caches held at the end of each "
             "generation, as a share of an fp16 cache of the same tokens (all of them counted: codes, scales, "
             "scores, positions; an fp32 full cache is 200%; '-' where no sample counted them).", ""]
    for length, rows in summary(results).items():
        lines += [f"## {length} tokens", "",
                  markdown_table(rows, ["configuration", "budget", KV_COLUMN, *tasks], floatfmt=".3f")]
    depths = depth_summary(results)
    if depths:
        lines += ["## Score by needle depth", "",
                  "Mean score (samples) of the samples whose answer lies in each tenth of the prompt (by characters; "
                  "0% = the start).", ""]
        columns = [_depth_column(b) for b in range(DEPTH_BINS)]
        for (length, task), rows in depths.items():
            lines += [f"### {task}, {length} tokens", "",
                      markdown_table(rows, ["configuration", "budget", *columns], floatfmt=".2f")]
    commands = results["commands"]
    lines += [f"Updated {results.get('updated') or results['created']}; {len(commands)} command(s), all in the "
              "JSON" + (f"; the last: `{commands[-1]}`" if commands else ""), ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], output: str | os.PathLike) -> dict[str, Path]:
    """``OUTPUT.md`` (the table) and ``OUTPUT_TASK_LENGTH.png`` (score vs budget, one line per policy, the full
    cache as a horizontal line) next to the JSON ``output``."""
    path = Path(output)
    paths = {"json": path, "md": write_text(path.with_suffix(".md"), report_markdown(results))}
    curves: dict[tuple[str, int], dict[str, dict[float, float]]] = {}
    full: dict[tuple[str, int], float] = {}
    for entry in results["cells"].values():
        mean, _, n = cell_stats(entry)
        if n == 0:
            continue
        where = (entry["task"], entry["length"])
        if entry["policy"] == FULL:
            full[where] = mean
        else:
            curves.setdefault(where, {}).setdefault(_label(entry), {})[entry["budget"]] = mean
    for (task, length), lines in sorted(curves.items()):
        series = {label: (sorted(points), [points[b] for b in sorted(points)]) for label, points in lines.items()}
        png = line_plot(path.with_name(f"{path.stem}_{task}_{length}.png"), series,
                        title=f"RULER {task}, {length} tokens", xlabel="KV budget (% of prompt)",
                        ylabel="score", xpercent=True,
                        hlines={FULL: full[task, length]} if (task, length) in full else None)
        if png is not None:
            paths[f"png_{task}_{length}"] = png
    return paths


# ---- command line -------------------------------------------------------------------------------------------------
def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from h2o_cache.cli import add_model_options

    add_model_options(parser)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder RULER sizes its samples with (default: the model's folder)")
    parser.add_argument("--tasks", type=_csv(str), default=list(DEFAULT_TASKS),
                        help=f"comma-separated RULER tasks (default: {','.join(DEFAULT_TASKS)}); offline: "
                             f"{','.join(OFFLINE_TASKS)}")
    parser.add_argument("--lengths", type=_csv(int), default=list(DEFAULT_LENGTHS),
                        help="comma-separated prompt lengths in tokens (default 4096,8192)")
    parser.add_argument("--policies", type=_csv(str), default=list(DEFAULT_POLICIES),
                        help=f"comma-separated caches among {','.join(ALL_POLICIES)} (full = uncompressed; "
                             "default: %(default)s)")
    parser.add_argument("--budgets", type=_csv(float), default=list(DEFAULT_BUDGETS),
                        help="comma-separated KV budgets as fractions of the prompt (default 0.1,0.2,0.5)")
    parser.add_argument("--limit", type=int, default=50, help="samples per cell, the first N (default 50)")
    parser.add_argument("--cache-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra H2OConfig field for the compressed policies (e.g. sink_tokens=8); repeat")
    parser.add_argument("--batch-size", type=int, default=1, help="generation batch size (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy (default 0)")
    parser.add_argument("--chunk", type=int, default=10,
                        help="samples evaluated between two saves of --output (default 10)")
    parser.add_argument("--output", default="results/ruler.json",
                        help="results JSON; the table (.md) and plots (.png) go next to it (default %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue --output: only the samples it does not hold yet are evaluated")
    parser.add_argument("--force", action="store_true", help="start --output over if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                        help="run nothing: join results files of the same settings (a run split across "
                             "processes) into --output, with its table and plots")


def main(argv: Sequence[str]) -> int:
    """``h2o-cache ruler ARGV...``; 2 on a user mistake or a missing extra (one line, no traceback)."""
    parser = argparse.ArgumentParser(prog="h2o-cache ruler",
                                     description="RULER's offline synthetic tasks through lm-eval, per KV cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            if any(Path(p).resolve() == Path(args.output).resolve() for p in args.merge):
                raise ValueError(f"--output {args.output!r} is also a --merge input; choose another file")
            results = merge_results(args.merge)
            check_results_file(args.output, False, args.force)
            write_json(args.output, results)
            return _print_report(results, args.output)
        require_ruler()
        options = parse_cache_options(args.cache_option)
        check_tasks(args.tasks)
        check_lengths(args.lengths)
        check_policies(args.policies)
        check_budgets(args.budgets)
        if args.limit < 1:
            raise ValueError(f"--limit: samples per cell must be >= 1, got {args.limit}")
        check_results_file(args.output, args.resume, args.force)
        from h2o_cache.models import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                      device=args.device)
        results = run_ruler(
            model, tokenizer, output=args.output, tasks=args.tasks, lengths=args.lengths, policies=args.policies,
            budgets=args.budgets, limit=args.limit, cache_options=options, tokenizer_dir=args.tokenizer,
            batch_size=args.batch_size, seed=args.seed, chunk=args.chunk, resume=args.resume, force=args.force,
            model_name=args.model or "embedded SmolLM2-135M-Instruct",
            command=" ".join(["h2o-cache ruler", *argv]), progress=not args.no_progress)
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _print_report(results, args.output)


def _print_report(results: dict[str, Any], output: str) -> int:
    paths = write_report(results, output)
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0
