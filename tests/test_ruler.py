"""RULER through lm-eval with the `h2o` model (eval/ruler.py): the CI smoke run on a tiny random model with a
saved byte-level tokenizer (a few samples of niah_single_1 at 1024 tokens), `simple_evaluate(model="h2o")` as a
user calls it, and the driver's resumable results file."""

from __future__ import annotations

import json

import pytest

from h2o_cache.cli import main

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords", reason="the ruler extra: pip install 'h2o-cache[ruler]'")

from h2o_cache.eval import ruler  # noqa: E402  (after the skips: it needs lm-eval)

LENGTH = 1024  # the smallest niah_single_1 length whose haystack fits the byte tokenizer's prompt + 128 new tokens
TASK = "niah_single_1"


def _ruler_manager(folder):
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    ruler_dir = Path(lm_eval.__file__).parent / "tasks" / "ruler"
    return TaskManager(include_path=str(ruler_dir), include_defaults=False,
                       metadata={"max_seq_lengths": [LENGTH], "tokenizer": str(folder)})


def test_simple_evaluate_by_name_runs_ruler(tiny_lm_folder):
    import h2o_cache.eval  # noqa: F401  (registers "h2o")

    # Exactly as a user calls it: lm-eval builds its own TaskManager and hands model_args + metadata to the task.
    out = lm_eval.simple_evaluate(model="h2o", model_args=f"pretrained={tiny_lm_folder},policy=full", tasks=[TASK],
                                  metadata={"max_seq_lengths": [LENGTH]}, limit=2, bootstrap_iters=0)
    assert out["n-samples"][TASK]["effective"] == 2
    assert 0.0 <= out["results"][TASK][f"{LENGTH},none"] <= 1.0
    # The budget as H2O's two ratios, another policy.
    out = lm_eval.simple_evaluate(
        model="h2o", model_args=f"pretrained={tiny_lm_folder},heavy_ratio=0.1,recent_ratio=0.1,policy=streaming",
        tasks=[TASK], task_manager=_ruler_manager(tiny_lm_folder), limit=1, bootstrap_iters=0)
    assert out["n-samples"][TASK]["effective"] == 1
    assert out["config"]["model"] == "h2o"


def test_cli_runs_cells_then_resumes_only_the_missing_samples(tiny_lm_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ruler.json"
    args = ["ruler", "--model", str(tiny_lm_folder), "--tasks", TASK, "--lengths", str(LENGTH),
            "--policies", "full,h2o", "--budgets", "0.2", "--limit", "1", "--no-progress", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| full | 100% |" in printed and "| h2o | 20% |" in printed and "(1)" in printed
    results = json.loads(out.read_text())
    keys = {f"{TASK}|{LENGTH}|full|1", f"{TASK}|{LENGTH}|h2o|0.2"}
    assert set(results["cells"]) == keys
    assert all(list(c["samples"]) == ["0"] for c in results["cells"].values())
    # The byte axis: what each cell's caches held, against an fp16 cache of the same tokens (fp32 full: 200%).
    full, h2o = (results["cells"][f"{TASK}|{LENGTH}|{p}"] for p in ("full|1", "h2o|0.2"))
    assert full["kv_bytes"] == 2 * full["fp16_bytes"] > 0
    assert 0 < h2o["kv_bytes"] < 0.6 * h2o["fp16_bytes"]
    assert "| configuration | budget | KV bytes |" in printed and "| full | 100% | 200.0% |" in printed
    assert out.with_suffix(".md").exists() and (tmp_path / f"ruler_{TASK}_{LENGTH}.png").exists()

    # The file exists: neither overwritten nor resumed without being asked.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err

    # Resuming with a larger limit evaluates the new samples only.
    asked = []
    real = lm_eval.simple_evaluate

    def counting(*a, **kw):
        asked.append(kw["samples"])
        return real(*a, **kw)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    grow = [*args[:-5], "--limit", "2", "--policies", "h2o", "--no-progress", "--output", str(out), "--resume"]
    assert main(grow) == 0
    assert asked == [{TASK: [1]}]
    results = json.loads(out.read_text())
    assert [len(results["cells"][k]["samples"]) for k in sorted(keys)] == [1, 2]
    assert results["cells"][f"{TASK}|{LENGTH}|full|1"]["samples"]["0"]["input_sha1"]
    h2o_samples = results["cells"][f"{TASK}|{LENGTH}|h2o|0.2"]["samples"]
    assert all(0 <= s["depth"] < 1 for s in h2o_samples.values())
    # A sample stored before depths were gets its depth on the next resume, without being run again.
    depth = h2o_samples["0"].pop("depth")
    out.write_text(json.dumps(results))
    assert main(grow) == 0 and asked == [{TASK: [1]}]
    assert json.loads(out.read_text())["cells"][f"{TASK}|{LENGTH}|h2o|0.2"]["samples"]["0"]["depth"] == depth

    # Other settings would make cells that do not compare: refused, the file kept.
    before = out.read_text()
    assert main([*grow, "--seed", "3"]) == 2
    assert "seed" in capsys.readouterr().err and out.read_text() == before
    # So would another sample under the same number (another tokenizer, another lm-eval).
    results["cells"][f"{TASK}|{LENGTH}|h2o|0.2"]["samples"]["1"]["input_sha1"] = "0" * 12
    out.write_text(json.dumps(results))
    assert main(grow) == 2
    assert "differs" in capsys.readouterr().err


def test_cell_statistics_and_table():
    entry = {"task": TASK, "length": 4096, "policy": "h2o", "budget": 0.2, "options": {},
             "samples": {str(i): {"score": float(i % 2)} for i in range(4)}}
    mean, err, n = ruler.cell_stats(entry)
    assert (mean, n) == (0.5, 4) and err == pytest.approx((1 / 3) ** 0.5 / 2)
    results = {"settings": {"lm_eval": "x", "model": "m", "dtype": "float32"}, "created": "now", "commands": [],
               "cells": {"a": entry}}
    # A cell from before the byte counter shows '-'; bytes sum over a configuration's cells (tasks).
    assert f"| h2o | 20% | - | 0.500 ± {err:.3f} (4) |" in ruler.report_markdown(results)
    other = {**entry, "task": "niah_multikey_2", "kv_bytes": 30, "fp16_bytes": 100}
    results["cells"] = {"a": {**entry, "kv_bytes": 10, "fp16_bytes": 100}, "b": other}
    assert "| h2o | 20% | 20.0% | 0.500" in ruler.report_markdown(results)


def test_cells_apply_cache_options_to_the_compressed_policies_only():
    cells = ruler.make_cells([TASK], [4096], ["full", "h2o"], [0.1, 0.2], {"sink_tokens": 8})
    assert [c.key for c in cells] == [f"{TASK}|4096|full|1", f"{TASK}|4096|h2o|0.1|sink_tokens=8",
                                      f"{TASK}|4096|h2o|0.2|sink_tokens=8"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--cache-option", "kv_nope=4"], "--cache-option"),
    (["--cache-option", "sink_tokens=-1"], "sink_tokens"),
    (["--policies", "lru"], "policies"),
    (["--budgets", "1.5"], "budgets"),
    (["--tasks", "niah_single_9"], "niah_single_1"),
    (["--lengths", "100"], "lengths"),
    (["--resume", "--force"], "--resume"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["ruler", *argv, "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wonderwords" else real(name, *a))
    with pytest.raises(ImportError, match=r"wonderwords: pip install 'h2o-cache\[ruler\]'"):
        ruler.require_ruler()
    assert main(["ruler", "--limit", "1"]) == 2
    assert "pip install 'h2o-cache[ruler]'" in capsys.readouterr().err


def test_needle_depth_and_the_table_by_depth():
    filler = "The grass is green. " * 40
    doc = {"input": filler + "One of the special magic numbers for x is: 1234567." + filler, "outputs": ["1234567"]}
    assert ruler.needle_depth(doc) == pytest.approx(len(filler) / len(doc["input"]) + 44 / len(doc["input"]), abs=1e-3)
    # Tasks with no needle (variable tracking, word counts) have no depth, even when the answer occurs.
    assert ruler.needle_depth({"input": "VAR A = 5 ... VAR B = VAR A", "outputs": ["A", "B"]}) is None
    assert ruler.needle_depth({"input": "special magic", "outputs": ["absent"]}) is None
    samples = {"0": {"score": 1.0, "depth": 0.95}, "1": {"score": 0.0, "depth": 0.5}, "2": {"score": 1.0, "depth": 0.99},
               "3": {"score": 0.0}}
    results = {"settings": {"lm_eval": "x", "model": "m", "dtype": "float32"}, "created": "now", "commands": [],
               "cells": {"a": {"task": TASK, "length": 4096, "policy": "h2o", "budget": 0.2, "options": {},
                               "samples": samples}}}
    text = ruler.report_markdown(results)
    assert "| configuration | budget | 0-10% | 10-20% | 20-30% |" in text and "| 80-90% | 90-100% |" in text
    assert "| h2o | 20% | - | - | - | - | - | 0.00 (1) | - | - | - | 1.00 (2) |" in text


def test_merge_joins_split_runs_and_refuses_other_settings(tmp_path, capsys):
    def results(seed, samples):
        entry = {"task": TASK, "length": 4096, "policy": "h2o", "budget": 0.2, "options": {}, "seconds": 1.0,
                 "kv_bytes": 20, "fp16_bytes": 100,
                 "samples": {str(i): {"score": 1.0, "input_sha1": f"h{i}", "response": "x"} for i in samples}}
        return {"format": ruler.FORMAT, "created": "now", "updated": None, "commands": ["c"],
                "settings": {"model": "m", "dtype": "float32", "seed": seed, "batch_size": 1, "lm_eval": "x"},
                "cells": {"k": entry}}

    a, b, c, out = (tmp_path / f"{n}.json" for n in "abco")
    a.write_text(json.dumps(results(0, [0, 1])))
    b.write_text(json.dumps(results(0, [1, 2])))
    c.write_text(json.dumps(results(5, [3])))
    assert main(["ruler", "--merge", str(a), str(b), "--output", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["cells"]["k"]["samples"]) == ["0", "1", "2"] and merged["commands"] == ["c", "c"]
    # Sample 1 is in both files: its time and bytes count once (b adds half of its sums).
    cell = merged["cells"]["k"]
    assert (cell["seconds"], cell["kv_bytes"], cell["fp16_bytes"]) == (1.5, 30, 150)
    assert "(3)" in capsys.readouterr().out
    assert main(["ruler", "--merge", str(a), str(c), "--output", str(tmp_path / "x.json")]) == 2
    assert "settings" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert main(["ruler", "--merge", str(a), "--output", str(a), "--force"]) == 2


def test_model_args_reach_every_h2o_option(tiny_lm_folder):
    from h2o_cache.eval.lm_eval_model import h2o_lm_from_args

    lm = h2o_lm_from_args(f"pretrained={tiny_lm_folder},policy=h2o,budget=0.5,kv_bits=4,kv_key_axis=token")
    assert lm.h2o_options == {"kv_bits": 4, "kv_key_axis": "token"}
