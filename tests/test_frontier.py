"""The byte axis of ``h2o-cache eval --frontier`` (issue 9) and per-layer budgets, on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import tiny_llama_config
from transformers import DynamicCache

from h2o_cache import H2OCache
from h2o_cache.config import H2OConfig
from h2o_cache.eval import cli as eval_cli
from h2o_cache.eval.frontier import check_bars, evaluate_frontier, parse_spec
from h2o_cache.eval.frontier_report import write_frontier_report
from h2o_cache.runner import fp16_kv_bytes, kv_bytes

TEXT = "The quick brown fox jumps over the lazy dog. " * 60
# head_dim 16 in the tiny model: quantisation groups must divide it.
QUANT = {"kv_group_size": 8, "kv_residual": 4}


def test_fp16_reference_is_the_arithmetic_of_the_config():
    config = tiny_llama_config()  # 2 layers, 2 KV heads, head_dim 64 / 4 = 16
    assert fp16_kv_bytes(config, tokens=10, batch=3) == 2 * 2 * 2 * 2 * 16 * 10 * 3


def test_dynamic_cache_bytes_match_the_reference_by_dtype(tiny_llama):
    cache = DynamicCache(config=tiny_llama.config)
    with torch.inference_mode():
        tiny_llama(input_ids=torch.randint(3, 100, (2, 12)), past_key_values=cache, use_cache=True)
    assert kv_bytes(cache) == 2 * fp16_kv_bytes(tiny_llama.config, 12, 2)  # float32 = twice fp16


@pytest.fixture(scope="module")
def frontier(tiny_lm):
    model, tok = tiny_lm
    return evaluate_frontier(model, tok, specs=["full", "h2o@0.5", "h2o@0.5+int4", "keep_all+int8"],
                             tasks=("perplexity", "retrieval"), text=TEXT, prompt_len=32, gen_len=4, windows=2,
                             retrieval_lengths=(192,), retrieval_depths=(0.5,), retrieval_samples=1,
                             h2o_options=QUANT, progress=False)


def test_every_row_has_its_measured_byte_share(frontier, tiny_lm):
    model, _ = tiny_lm
    rows = {(r["spec"], r["task"]): r for r in frontier["rows"]}
    assert len(rows) == 8
    ppl = rows["full", "perplexity"]
    assert ppl["byte_share"] == 2.0  # fp32 DynamicCache of the same 36 tokens x 2 windows
    assert ppl["kv_bytes"] == 2 * fp16_kv_bytes(model.config, 32 + 4, 2)
    h2o = rows["h2o@0.5", "perplexity"]
    # 16 kept tokens + the scratch slot, keys and values in fp32, float32 scores and int32 positions per slot.
    slots = 16 + 1
    expect = model.config.num_hidden_layers * 2 * 2 * slots * (2 * 16 * 4 + 4 + 4)
    assert h2o["kv_bytes"] == expect
    assert h2o["byte_share"] == pytest.approx(expect / fp16_kv_bytes(model.config, 36, 2))
    assert rows["h2o@0.5+int4", "perplexity"]["byte_share"] < h2o["byte_share"]
    assert rows["keep_all+int8", "perplexity"]["byte_share"] < 1.0
    for r in frontier["rows"]:
        assert r["kv_bytes"] > 0 and 0 < r["byte_share"] <= 2.0
    assert rows["h2o@0.5+int4", "perplexity"]["method"] == "h2o+int4"
    assert rows["keep_all+int8", "perplexity"]["method"] == "keep_all (quantisation only)"


def test_report_writes_one_plot_one_table_and_json(frontier, tmp_path):
    paths = write_frontier_report(frontier, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"frontier.json", "frontier.md", "frontier.png"}
    assert json.loads(paths["json"].read_text())["settings"]["specs"][0] == "full"
    md = paths["md"].read_text()
    assert "| h2o@0.5+int4 |" in md and "byte share" in md
    assert paths["png"].stat().st_size > 1000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_runs_merge_into_one_report(frontier, tmp_path):
    from h2o_cache.eval.frontier_report import main as merge_main

    write_frontier_report(frontier, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "frontier.partial.json").write_text(json.dumps({"rows": frontier["rows"][2:4]}))
    assert merge_main([str(tmp_path / "m"), str(tmp_path / "a"), f"{tmp_path / 'b'}:g64"]) == 0
    merged = json.loads((tmp_path / "m" / "frontier.json").read_text())
    assert len(merged["rows"]) == len(frontier["rows"]) + 2
    assert merged["rows"][-1]["spec"].endswith(" g64") and merged["rows"][-1]["method"].endswith(" g64")
    assert merge_main([str(tmp_path / "n"), str(tmp_path / "missing")]) == 2


def test_bars_compare_at_no_more_bytes():
    def row(spec, family, share, ppl, acc, bits=None):
        base = {"spec": spec, "family": family, "bits": bits, "byte_share": share}
        return [{**base, "task": "perplexity", "perplexity": ppl}, {**base, "task": "retrieval", "accuracy": acc}]

    rows = (row("full", "full", 1.0, 10.0, 1.0) + row("h2o@0.5+int4", "h2o", 0.18, 10.4, 0.8, 4)
            + row("local@0.2", "local", 0.2, 13.0, 0.9) + row("quanto+int2", "quanto", 0.1, 11.0, 1.0, 2))
    bars = {b["bar"]: b for b in check_bars(rows)}
    first = bars["<= 20.0% of fp16 bytes: perplexity <= +5%, retrieval >= 70% of full"]
    assert first["met"] and first["spec"] == "h2o@0.5+int4"
    assert not bars["<= 12.5% of fp16 bytes: perplexity <= +12%"]["met"]  # no H2O spec measured at <= 12.5%
    assert bars["perplexity: best H2O at <= 20.0% of bytes vs local@0.2"]["met"]
    assert not bars["retrieval: best H2O at <= 20.0% of bytes vs local@0.2"]["met"]  # 0.8 < 0.9
    assert not any("quanto+int2" in b for b in bars)  # no H2O spec at <= 10%: nothing to compare


@pytest.mark.parametrize("text, message", [
    ("bogus", "FAMILY"), ("h2o", "needs a budget"), ("h2o@1.5", "needs a budget"), ("keep_all@0.2+int4", "no '@"),
    ("keep_all", "+int"), ("quanto+int8", "+int"), ("h2o@0.2+int3", "+int"),
])
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(ValueError, match="specs") as err:
        parse_spec(text)
    assert message in str(err.value)


@pytest.mark.parametrize("argv", [["--specs", "full,nope@2"], ["--kv-group-size", "0"], ["--pyramid-slope", "1.5"]])
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert eval_cli.main("eval", ["--frontier", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_help_explains_the_frontier_options(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main("eval", ["--help"])
    out = capsys.readouterr().out
    for option in ("--frontier", "--specs", "--kv-bits", "--kv-group-size", "--kv-key-axis", "--kv-residual",
                   "--layer-budgets", "--pyramid-slope", "--quant-residual", "--quant-group-size"):
        assert option in out


@pytest.mark.parametrize("budgets, slope", [((51, 51), 0.5), ((0, 102), 0.9), ((3, 2), 0.9), ((7, 0), 0.3),
                                            ((51, 51), -0.5)])
def test_pyramid_budgets_keep_the_uniform_total(budgets, slope):
    config = H2OConfig(heavy_budget=budgets[0], recent_budget=budgets[1], layer_budgets="pyramid",
                       pyramid_slope=slope)
    layers = [config.layer_token_budgets(512, i, 30) for i in range(30)]
    assert sum(h + r for h, r in layers) == 30 * sum(budgets)
    totals = [h + r for h, r in layers]
    ramp = totals if slope > 0 else totals[::-1]  # a negative slope gives the upper layers more
    assert ramp == sorted(ramp, reverse=True) and ramp[0] > ramp[-1] >= 1
    assert all(r >= 1 for _, r in layers) or budgets[1] == 0


def test_pyramid_cache_holds_the_same_total_as_uniform(tiny_llama):
    config = tiny_llama.config
    config.num_hidden_layers = 2
    ids = torch.randint(3, 100, (1, 40))
    kept = {}
    for mode in ("uniform", "pyramid"):
        cache = H2OCache(config, heavy_budget=5, recent_budget=5, layer_budgets=mode)
        with torch.inference_mode():
            tiny_llama(input_ids=ids, past_key_values=cache, use_cache=True)
        kept[mode] = [layer.stored for layer in cache.layers]
    assert kept["uniform"] == [10, 10]
    assert sum(kept["pyramid"]) == 20 and kept["pyramid"][0] > kept["pyramid"][1]


def test_pyramid_needs_the_layer_count():
    with pytest.raises(ValueError, match="layer_budgets"):
        H2OConfig(heavy_budget=4, recent_budget=4, layer_budgets="pyramid").layer_token_budgets(64, 0, None)


def test_quantized_cache_bytes_are_counted(tiny_llama):
    pytest.importorskip("optimum.quanto")
    from h2o_cache.eval.caches import make_cache

    cache, reason = make_cache("quantized", tiny_llama, None, 64, backend="quanto", nbits=4, q_group_size=16,
                               residual_length=4)
    assert reason is None
    with torch.inference_mode():
        tiny_llama(input_ids=torch.randint(3, 100, (1, 64)), past_key_values=cache, use_cache=True)
    values = 2 * 2 * 2 * 64 * 16  # layers x (K, V) x KV heads x tokens x head_dim, all quantised (no residual)
    # 4-bit codes two a byte, and a float32 scale and shift per group of 16 values.
    assert kv_bytes(cache) == values // 2 + values // 16 * 2 * 4
