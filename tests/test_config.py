import pytest

from h2o_cache import H2OCache, H2OConfig


def test_defaults_are_the_papers():
    cfg = H2OConfig()
    assert (cfg.heavy_ratio, cfg.recent_ratio) == (0.1, 0.1)
    assert cfg.token_budgets(4096) == (409, 409)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"heavy_ratio": -0.1}, "heavy_ratio"),
        ({"heavy_ratio": 0.0}, "heavy_ratio"),
        ({"recent_ratio": 1.5}, "recent_ratio"),
        ({"heavy_budget": -1}, "heavy_budget"),
        ({"heavy_budget": 0, "recent_budget": 0}, "heavy_budget \\+ recent_budget"),
        ({"heavy_ratio": 0.1, "recent_budget": 8}, "not both"),
        ({"policy": "lru"}, "policy"),
        ({"gqa_aggregation": "sum"}, "gqa_aggregation"),
        ({"score_normalization": "z"}, "score_normalization"),
        ({"heavy_budget": 2.5}, "heavy_budget"),
        ({"prefill_chunk_size": 0, "heavy_budget": 1}, "prefill_chunk_size"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        H2OConfig(**kwargs)


def test_unknown_cache_config_key():
    with pytest.raises(ValueError, match="unknown option.*heavy"):
        H2OConfig.from_dict({"heavy": 3})


def test_ratio_budgets_resolve_at_prefill_length():
    cfg = H2OConfig(heavy_ratio=0.25, recent_ratio=0.5)
    assert cfg.token_budgets(100) == (25, 50)
    # A tiny prompt still leaves one slot for the token being written.
    assert sum(H2OConfig(heavy_ratio=0.1, recent_ratio=0.1).token_budgets(3)) >= 1


def test_cache_rejects_config_and_options_together():
    with pytest.raises(ValueError, match="either h2o_config or keyword options"):
        H2OCache(None, H2OConfig(), heavy_budget=3)
