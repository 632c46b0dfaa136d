"""Build the project's local lm-eval tasks, reproducibly, from real text (offline: no dataset hub).

    python -m h2o_cache.eval.lm_eval_tasks [--text FILE] [--docs 40] [--seed 0] [--out eval/tasks]

writes three tasks (JSONL data + YAML config), all tagged ``h2o_local``:

- ``h2o_cloze`` (loglikelihood): a passage whose last word already occurred earlier in it, LAMBADA-style, so
  the answer depends on the distant context that a KV cache may have evicted; metrics ``acc`` (greedy) and
  ``perplexity``.
- ``h2o_mc`` (multiple_choice): a passage and four candidate next sentences (the true one + three from other
  topics); ``acc``/``acc_norm``.
- ``h2o_passkey`` (generate_until): a pass key hidden in a real-text haystack, asked for at the end; the first
  number generated must equal it (``exact_match``).

The same text and seed always give the same files. Default text: ``pydoc_data.topics`` (the Python reference).

Standard lm-eval tasks (copa, piqa, ...) read their documents from the Hugging Face hub, which these machines
cannot reach. ``localize_standard_task`` makes a local variant of one: the task's own YAML (prompt, choices,
metrics) is included unchanged and only its dataset is pointed at a JSONL export with the same fields.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from .texts import passkey_text

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "tasks"
TAG = "h2o_local"
LOCAL_TASKS = ("h2o_cloze", "h2o_mc", "h2o_passkey")

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]{4,}")


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs (code samples and tables dropped): joined lines, >= 200 chars, mostly letters."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith((">>>", "...", "+", "|", "*")) or block.startswith("   "):
            continue
        para = " ".join(line.strip() for line in block.splitlines())
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(para) >= 200 and letters / len(para) > 0.9:
            out.append(para)
    return out


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _prose(paragraphs: Sequence[str], start: int, chars: int) -> tuple[str, int]:
    """Consecutive paragraphs from ``start`` until ``chars`` characters; returns (text, next index)."""
    parts, i = [], start
    while i < len(paragraphs) and sum(map(len, parts)) < chars:
        parts.append(paragraphs[i])
        i += 1
    return "\n\n".join(parts), i


def build_cloze(paragraphs: Sequence[str], docs: int, rng: random.Random, context_chars: int = 1200) -> list[dict]:
    """Passages ending in a sentence whose last word appeared earlier in the passage (>= ``context_chars`` back)."""
    out = []
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    for start in order:
        passage, _ = _prose(paragraphs, start, context_chars + 400)
        sentences = _sentences(passage)
        # Walk back from the end to a sentence whose last word is in the earlier part of the passage.
        for k in range(len(sentences) - 1, 0, -1):
            words = _WORD.findall(sentences[k])
            if not words or not sentences[k].rstrip().endswith("."):
                continue
            target = words[-1]
            before = " ".join(sentences[:k])
            head = sentences[k].rstrip()[: -1]
            if not head.endswith(target) or len(before) < context_chars // 2:
                continue
            if re.search(rf"\b{re.escape(target)}\b", before):
                context = (before + " " + head[: -len(target)]).rstrip()
                out.append({"context": context, "target": " " + target})
                break
        if len(out) == docs:
            break
    return out


def build_mc(paragraphs: Sequence[str], docs: int, rng: random.Random, context_chars: int = 1000) -> list[dict]:
    """A passage and four candidate next sentences: the true one and three from random other paragraphs."""
    pool = [s for p in paragraphs for s in _sentences(p) if 40 <= len(s) <= 160]
    out = []
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    for start in order:
        passage, _ = _prose(paragraphs, start, context_chars)
        sentences = _sentences(passage)
        if len(sentences) < 4 or not 40 <= len(sentences[-1]) <= 160:
            continue
        truth = sentences[-1]
        distractors = rng.sample([s for s in pool if s != truth], 3)
        choices = distractors + [truth]
        rng.shuffle(choices)
        out.append({"context": " ".join(sentences[:-1]), "choices": choices, "label": choices.index(truth)})
        if len(out) == docs:
            break
    return out


def build_passkey(paragraphs: Sequence[str], docs: int, rng: random.Random, context_chars: int = 1400
                  ) -> list[dict]:
    """A pass key at a seeded depth of a real-text haystack, asked for at the end."""
    out = []
    for _ in range(docs):
        hay, _ = _prose(paragraphs, rng.randrange(len(paragraphs)), context_chars)
        hay = hay[:context_chars]
        key = str(rng.randint(10000, 99999))
        depth = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])
        cut = hay.rfind(" ", 0, int(depth * len(hay))) + 1
        out.append({"context": passkey_text(hay, key, cut), "target": key, "depth": depth})
    return out


_YAML = {
    "h2o_cloze": """\
task: h2o_cloze
tag: {tag}
dataset_path: json
custom_dataset: !function local_data.h2o_cloze
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
""",
    "h2o_mc": """\
task: h2o_mc
tag: {tag}
dataset_path: json
custom_dataset: !function local_data.h2o_mc
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "h2o_passkey": """\
task: h2o_passkey
tag: {tag}
dataset_path: json
custom_dataset: !function local_data.h2o_passkey
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def write_tasks(out_dir: str | Path = TASK_DIR, *, text: str | None = None, docs: int = 40, seed: int = 0
                ) -> list[Path]:
    """Write the three tasks' JSONL + YAML into ``out_dir``; returns the written paths."""
    if docs < 1:
        raise ValueError(f"docs must be >= 1, got {docs}")
    if text is None:
        from h2o_cache.models import reference_text

        text = reference_text()
    paragraphs = _paragraphs(text)
    if len(paragraphs) < 20:
        raise ValueError(f"text: only {len(paragraphs)} prose paragraphs found; need at least 20")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {"h2o_cloze": build_cloze, "h2o_mc": build_mc, "h2o_passkey": build_passkey}
    written = []
    for offset, (name, build) in enumerate(builders.items()):
        rows = build(paragraphs, docs, random.Random(seed * 1000 + offset))
        if len(rows) < docs:
            logger.warning("%s: only %d documents could be built (asked for %d)", name, len(rows), docs)
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        # The YAML loads its documents through local_data.py (copied next to it), relative to its own folder.
        yaml = out_dir / f"{name}.yaml"
        yaml.write_text(_YAML[name].format(tag=TAG))
        written += [data, yaml]
    loader = out_dir / "local_data.py"
    if loader.resolve() != (TASK_DIR / "local_data.py").resolve():
        shutil.copyfile(TASK_DIR / "local_data.py", loader)
    return written


def standard_task_yaml(task: str) -> Path:
    """The YAML file that defines lm-eval's task ``task``.

    A scan for its ``task:`` line takes ~2 s; lm-eval's full task index (the fallback, for tasks named another
    way) takes tens of seconds on 2 cores.
    """
    import lm_eval

    line = re.compile(rf"^task:\s*['\"]?{re.escape(task)}['\"]?\s*$", re.M)
    found = [p for p in sorted((Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"))
             if line.search(p.read_text(errors="ignore"))]
    if len(found) == 1:
        return found[0]
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    if entry is None or getattr(entry, "yaml_path", None) is None or entry.kind.name != "TASK":
        raise ValueError(f"task={task!r} is not a single lm-eval task with a YAML config (a group or unknown name)")
    return Path(entry.yaml_path)


def localize_standard_task(task: str, data_file: str | Path, out_dir: str | Path) -> str:
    """Write ``<task>_local.yaml`` into ``out_dir``: lm-eval's own ``task`` reading ``data_file`` instead of the hub.

    ``data_file`` is a JSONL export of the split to evaluate (one document a line, the dataset's own fields); it
    becomes the local task's test split. Returns the local task's name; pass ``out_dir`` as the extra task
    folder (``run_lm_eval(include_path=...)``).
    """
    data = Path(data_file).resolve()
    if not data.is_file():
        raise ValueError(f"data_file={str(data_file)!r}: no such file (a JSONL export of {task!r}'s documents)")
    yaml_path = standard_task_yaml(task)
    name = f"{task}_local"
    # `include` takes the task's YAML whole (its !function references resolve against its own folder); the keys
    # after it replace the dataset and splits only. JSON is YAML, so every value is written with json.dumps.
    settings = {
        "include": str(yaml_path), "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "training_split": None, "validation_split": None,
        "fewshot_split": None, "test_split": "test",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h2o_cache.eval.lm_eval_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=None, help="source text file (default: pydoc_data.topics)")
    parser.add_argument("--docs", type=int, default=40, help="documents per task (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--out", default=str(TASK_DIR), help="output folder (default: the package's eval/tasks)")
    args = parser.parse_args(argv)
    text = Path(args.text).read_text() if args.text else None
    for path in write_tasks(args.out, text=text, docs=args.docs, seed=args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
