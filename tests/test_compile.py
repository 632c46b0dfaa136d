"""torch.compile: an imported h2o_cache leaves other models' compiled graphs alone; H2O's decode step compiles.

1. A model without an H2OCache compiles with ``fullgraph=True`` and the same graph count (one, no break) with
   the patches applied as without them, also through transformers' static-cache compiled ``generate``.
2. ``generate(cache_implementation="h2o", compile_config=...)`` compiles the decode step with ``fullgraph=True``
   (a graph break would raise) and gives the eager run's tokens and logits, per family, with eviction.

``backend="eager"`` (dynamo tracing only) keeps this fast; what it checks is the tracing, which is what a
graph break or a host sync would break. Inductor's speed is measured by ``eval/compile_decode.py``.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import tiny_llama_config
from transformers import CompileConfig

import h2o_cache

BASE = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=37, num_attention_heads=4, vocab_size=99,
    max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# The families of docs/SUPPORT.md (the test_families.py table, smaller).
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=8)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(num_key_value_heads=2, partial_rotary_factor=0.5)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=8)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(ffn_dim=37, word_embed_proj_dim=32)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(rotary_pct=0.25)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()
    h2o_cache.enable()


def _counting_compile_config() -> tuple[CompileConfig, list]:
    """fullgraph=True (a graph break raises) with dynamo only; the list receives one entry per compiled graph."""
    graphs: list = []

    # A function, not torch's CompileCounter: transformers deep-copies the config, and a function survives that.
    def backend(graph_module, example_inputs, **kwargs):
        graphs.append(graph_module)
        return graph_module.forward

    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    return config, graphs


def _graphs_and_breaks(model, ids) -> tuple[int, int]:
    torch.compiler.reset()
    explained = torch._dynamo.explain(model)(ids, use_cache=False)
    return explained.graph_count, explained.graph_break_count


def test_imported_package_leaves_other_models_compiling_in_one_graph():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 99, (1, 5))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(ids, use_cache=False).logits
        torch.testing.assert_close(compiled, expected)
        with_patches = _graphs_and_breaks(model, ids)
        h2o_cache.disable()
        without_patches = _graphs_and_breaks(model, ids)
    assert with_patches == without_patches == (1, 0)


def test_static_cache_compiled_generate_unaffected():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(3, 100, (2, 12))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, cache_implementation="static")
    config, graphs = _counting_compile_config()
    compiled = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                              cache_implementation="static", compile_config=config)
    assert len(graphs) >= 1  # the decode step went through dynamo, in one graph (fullgraph=True)
    assert torch.equal(compiled, eager)


def _family_model(family: str) -> torch.nn.Module:
    config_cls, model_cls, overrides = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{**BASE, **overrides})
    config._attn_implementation = "sdpa"
    return model_cls(config).eval()


def _h2o_generate(model, ids, attention_mask=None, compile_config=None):
    return model.generate(
        ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
        cache_implementation="h2o", cache_config={"heavy_budget": 4, "recent_budget": 4},
        compile_config=compile_config, output_logits=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_h2o_decode_matches_eager(family):
    model = _family_model(family)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, 24), generator=generator)
    mask = torch.ones_like(ids)
    if family == "llama":  # left padding: the validity masking inside the traced step
        ids[1, :7], mask[1, :7] = 0, 0
    eager = _h2o_generate(model, ids, mask)
    config, graphs = _counting_compile_config()
    compiled = _h2o_generate(model, ids, mask, config)
    # fullgraph=True: any graph break inside the decode step would have raised. Automatic dynamic shapes
    # recompile once when the step counter changes, then the step is reused.
    assert 1 <= len(graphs) <= 3
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
