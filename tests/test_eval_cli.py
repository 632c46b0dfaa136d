"""The evaluation commands from the outside: `h2o-cache lm-eval` (lm-eval's own command line with the `h2o`
model), the shipped task YAMLs as lm-eval reads them, and `simple_evaluate(model="h2o")`."""

from __future__ import annotations

import json

import pytest

from h2o_cache.cli import main

lm_eval = pytest.importorskip("lm_eval")


def test_shipped_task_yamls_parse_for_include_path():
    from lm_eval.tasks import TaskManager

    from h2o_cache.eval.lm_eval_tasks import LOCAL_TASKS, TASK_DIR

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(LOCAL_TASKS) <= set(manager.all_tasks)


def test_lm_eval_pass_through_runs_a_local_task(tiny_lm_folder, tmp_path, capsys):
    from h2o_cache.eval.lm_eval_tasks import TASK_DIR

    out = tmp_path / "out"
    rc = main(["lm-eval", "--model", "h2o", "--model_args",
               f"pretrained={tiny_lm_folder},heavy_ratio=0.1,recent_ratio=0.1,policy=h2o,gqa_aggregation=max",
               "--tasks", "h2o_mc,h2o_passkey", "--include_path", str(TASK_DIR), "--limit", "2",
               "--num_fewshot", "1", "--output_path", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "h2o_mc" in printed and "h2o_passkey" in printed
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["n-samples"]["h2o_mc"]["effective"] == 2
    assert "acc,none" in results["results"]["h2o_mc"]


def test_simple_evaluate_by_name_with_the_full_cache(tiny_lm_folder):
    import h2o_cache.eval  # noqa: F401  (registers "h2o")
    from h2o_cache.eval.lm_eval_model import task_manager

    out = lm_eval.simple_evaluate(model="h2o", model_args=f"pretrained={tiny_lm_folder},policy=full",
                                  tasks=["h2o_passkey"], limit=2, task_manager=task_manager(None, False),
                                  bootstrap_iters=0)
    assert out["n-samples"]["h2o_passkey"]["effective"] == 2


def test_bad_model_args_name_the_parameter(tiny_lm_folder):
    from h2o_cache.eval.lm_eval_model import h2o_lm_from_args

    with pytest.raises(ValueError, match="pretrained"):
        h2o_lm_from_args("policy=h2o")
    with pytest.raises(ValueError, match="policy"):
        h2o_lm_from_args(f"pretrained={tiny_lm_folder},policy=lru")
