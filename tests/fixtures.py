"""Helpers shared by the tests and by tests/support_matrix.py: tiny random models of every supported family (and of
the refused ones), prompts, greedy and teacher-forced decoding, reference attention. Test files import these (or
the fixtures in conftest.py), never each other."""

from __future__ import annotations

import torch
import transformers as tf
from transformers import DynamicCache, LlamaConfig

import h2o_cache  # noqa: F401  (applies the patches)
from h2o_cache import H2OCache
from h2o_cache.compat import cache_kwargs


def tiny_llama_config(**overrides) -> LlamaConfig:
    options = dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    options.update(overrides)
    return LlamaConfig(**options)


def byte_tokenizer():
    """A byte-level tokenizer built offline (ids 32..126 are the printable ASCII characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2, "\n": 10})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.padding_side = "left"
    return tokenizer


BASE = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=100,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# name -> (config class, model class, overrides, what the family adds to the test)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2), "GQA, RoPE"),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None), "GQA"),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2), "QKV bias"),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16), "QK norm"),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(num_key_value_heads=2, partial_rotary_factor=0.5),
             "fused QKV, partial RoPE"),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=16), "MQA"),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(ffn_dim=128, word_embed_proj_dim=64), "learned positions, no RoPE"),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(rotary_pct=0.25), "partial RoPE (25%)"),
}
# Hybrid and sliding-window families: (config class, model class, overrides, what it adds, backends). Two layers,
# sliding then full where the family has both (window 8 < the 40-token prompt, so the windows really slide).
_HYBRID_LAYERS = ["sliding_attention", "full_attention"]
_GQA16 = dict(num_key_value_heads=2, head_dim=16)
HYBRID_FAMILIES = {
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(_GQA16, sliding_window=8, layer_types=_HYBRID_LAYERS, attn_logit_softcapping=1.0),
               "sliding/full, logit softcapping (cap 1.0)", ("eager",)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(_GQA16, sliding_window=8, layer_types=_HYBRID_LAYERS),
               "sliding/full, QK norm", ("sdpa", "eager")),
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                dict(_GQA16, sliding_window=8, layer_types=_HYBRID_LAYERS, num_local_experts=4,
                     num_experts_per_tok=2),
                "sliding/full, attention sinks (s_aux), MoE", ("eager",)),
    "cohere2": (tf.Cohere2Config, tf.Cohere2ForCausalLM,
                dict(num_key_value_heads=2, sliding_window=8, layer_types=_HYBRID_LAYERS),
                "sliding/full, parallel block", ("sdpa", "eager")),
    "exaone4": (tf.Exaone4Config, tf.Exaone4ForCausalLM,
                dict(num_key_value_heads=2, sliding_window=8, layer_types=_HYBRID_LAYERS),
                "sliding/full, no RoPE on full layers", ("sdpa", "eager")),
    "olmo3": (tf.Olmo3Config, tf.Olmo3ForCausalLM,
              dict(num_key_value_heads=2, sliding_window=8, layer_types=_HYBRID_LAYERS),
              "sliding/full, QK norm", ("sdpa", "eager")),
    "ministral": (tf.MinistralConfig, tf.MinistralForCausalLM,
                  dict(_GQA16, sliding_window=8, layer_types=_HYBRID_LAYERS), "sliding/full", ("sdpa", "eager")),
    "llama4 (chunked)": (tf.Llama4TextConfig, tf.Llama4ForCausalLM,
                         dict(_GQA16, attention_chunk_size=8, layer_types=["chunked_attention", "full_attention"],
                              no_rope_layers=[1, 0], num_local_experts=2, num_experts_per_tok=1,
                              intermediate_size_mlp=128),
                         "chunked (chunk 8)/full, MoE", ("sdpa", "eager")),
    "qwen2 (use_sliding_window)": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                                   dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                        max_window_layers=1),
                                   "full/sliding (max_window_layers=1)", ("sdpa", "eager")),
    "mistral (sliding_window)": (tf.MistralConfig, tf.MistralForCausalLM,
                                 dict(num_key_value_heads=2, sliding_window=8),
                                 "every layer sliding: no H2O layer", ("sdpa", "eager")),
}
BACKENDS = ("sdpa", "eager")
PROMPT, NEW = 40, 24  # the 20% budget is 8 tokens; 64 tokens seen in all


def make_model(family: str, attn: str = "sdpa", dtype=torch.float32):
    config_cls, model_cls, overrides, *_ = FAMILIES[family] if family in FAMILIES else HYBRID_FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{**BASE, **overrides})
    config._attn_implementation = attn
    return model_cls(config).to(dtype).eval()


def prompt_ids(batch: int = 2, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, length), generator=generator)


def greedy(model, ids, new_tokens=NEW, **kwargs):
    """Exactly ``new_tokens`` greedy tokens (EOS ignored), with the logits of every step."""
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    kwargs.setdefault("pad_token_id", 0)
    return model.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


def max_logit_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


def check_exact(family: str, attn: str) -> float:
    """Budget >= everything seen: tokens identical to the model's own DynamicCache(config) (which slides the
    window layers of a hybrid model the same way), logits within 1e-5; returns the largest logit difference."""
    model = make_model(family, attn)
    ids = prompt_ids()
    ref = greedy(model, ids, past_key_values=DynamicCache(config=model.config))
    cache = H2OCache(model.config, heavy_budget=PROMPT + NEW, recent_budget=PROMPT + NEW)
    out = greedy(model, ids, past_key_values=cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(layer.evicted == 0 for layer in cache._h2o_layers())
    _window_layers_hold_their_window(model, cache)
    diff = max_logit_diff(out, ref)
    assert diff < 1e-5, diff
    return diff


def check_eviction(family: str, attn: str):
    """20% budget through cache_implementation="h2o": stored size equals the budget from the first step on."""
    model = make_model(family, attn)
    ids = prompt_ids()
    out = greedy(model, ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})
    cache = out.past_key_values
    assert isinstance(cache, H2OCache)
    assert cache.budget() == 8 and cache.tokens_kept() == 8
    assert cache.get_seq_length() == PROMPT + NEW - 1
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8 + 1  # the budget plus the scratch slot
        assert layer.positions.shape == layer.scores.shape == layer.keys.shape[:3]
    # The prompt was attended to in full before anything was evicted.
    ref = greedy(model, ids, new_tokens=1, past_key_values=DynamicCache(config=model.config))
    assert (out.logits[0] - ref.logits[0]).abs().max() < 1e-5
    assert all(torch.isfinite(step).all() for step in out.logits)
    return out


def teacher_forced_logits(model, ids: torch.Tensor, continuation: torch.Tensor, cache) -> torch.Tensor:
    """``[batch, 1 + len, vocab]`` float logits: the prompt's last position, then each token of ``continuation``
    (``[batch, len]``) fed one decode step at a time through ``cache``."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
        steps = [out.logits[:, -1]]
        for t in range(continuation.shape[1]):
            out = model(input_ids=continuation[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1).float()


def left_padded(seqs, pad_id=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    return ids, mask


def eager_reference(q, k, v, scaling, key_valid=None):
    """Plain attention with repeated KV heads; the last q keys are causal w.r.t. the queries."""
    bsz, hq, q_len, _ = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    rep = hq // hkv
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = (q @ kr.transpose(-1, -2)) * scaling
    past = k_len - q_len
    causal = torch.arange(k_len)[None, :] > (past + torch.arange(q_len))[:, None]
    logits = logits.masked_fill(causal, float("-inf"))
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid.repeat_interleave(rep, 1)[:, :, None, :], float("-inf"))
    probs = logits.softmax(-1)
    return (probs @ vr).transpose(1, 2), probs


def _t5():
    return tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=100, decoder_start_token_id=0)
    )


def _t5gemma():
    sub = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, vocab_size=100)
    return tf.T5GemmaForConditionalGeneration(tf.T5GemmaConfig(encoder=sub, decoder=sub, vocab_size=100))


def _qwen3_next():
    return tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
        **{**BASE, "num_key_value_heads": 2, "head_dim": 16, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
           "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1,
           "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
           "layer_types": ["linear_attention", "full_attention"]}))


REFUSED = {
    "t5 (encoder-decoder)": (_t5, "encoder-decoder"),
    # transformers 5.2's t5gemma does not override _prepare_cache_for_generation: the config check refuses it.
    "t5gemma (own _prepare_cache_for_generation)": (_t5gemma, "builds its own cache|encoder-decoder"),
}
if hasattr(tf, "Qwen3NextConfig"):  # transformers >= 5.x; linear-attention layers hold a recurrent state
    REFUSED["qwen3_next (linear-attention hybrid)"] = (_qwen3_next, "whose state H2O does not manage")


# ---- hybrid (sliding + full) families: the checks of tests/test_hybrid.py and docs/SUPPORT.md -------------------
def _window_layers_hold_their_window(model, cache) -> None:
    """Window layers are transformers' own, sized by the config; H2O layers sit exactly on the full layers."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from h2o_cache import H2OLayer

    for i, layer in enumerate(cache.layers):
        if cache.layer_type(i) == "full_attention":
            assert isinstance(layer, H2OLayer), i
        else:
            window = cache.layer_plan[i][1]
            assert type(layer) is DynamicSlidingWindowLayer, i
            assert window in (getattr(model.config, "sliding_window", None),
                              getattr(model.config, "attention_chunk_size", None))
            assert layer.sliding_window == window and layer.keys.shape[-2] <= window


# Hybrid models take the same exactness check.
check_hybrid_exact = check_exact


def check_hybrid_eviction(family: str, attn: str):
    """20% budget through cache_implementation="h2o": every H2O layer holds the 8-token budget (+ its scratch
    slot) from the first step on, every window layer its window; a model without full layers equals DynamicCache."""
    model = make_model(family, attn)
    ids = prompt_ids()
    out = greedy(model, ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})
    cache = out.past_key_values
    assert isinstance(cache, H2OCache) and cache.get_seq_length() == PROMPT + NEW - 1
    _window_layers_hold_their_window(model, cache)
    h2o_layers = cache._h2o_layers()
    if not h2o_layers:  # every layer slides: nothing for H2O to compress
        ref = greedy(model, ids, past_key_values=DynamicCache(config=model.config))
        assert torch.equal(out.sequences, ref.sequences) and cache.budget() is None
        return out
    assert cache.budget() == 8 and cache.tokens_kept() == 8
    for layer in h2o_layers:
        assert layer.keys.shape[-2] == 8 + 1 and layer.evicted > 0
    by_type = cache.kv_bytes_by_type()
    assert sum(by_type.values()) == cache.kv_bytes()
    per_slot = ids.shape[0] * model.config.num_key_value_heads * 2 * h2o_layers[0].keys.shape[-1] * 4
    kinds = [layer.kv_bytes_by_kind() for layer in h2o_layers]
    assert sum(k["keys"] + k["values"] for k in kinds) == len(h2o_layers) * 9 * per_slot
    assert by_type["full_attention"] == sum(sum(k.values()) for k in kinds)  # + scores, positions (bookkeeping)
    # The prompt was attended to in full before anything was evicted.
    ref = greedy(model, ids, new_tokens=1, past_key_values=DynamicCache(config=model.config))
    assert (out.logits[0] - ref.logits[0]).abs().max() < 1e-5
    assert all(torch.isfinite(step).all() for step in out.logits)
    return out


def check_hybrid_padded(family: str, attn: str, lengths=(40, 9, 3), heavy: int = 4, recent: int = 4) -> None:
    """A left-padded batch equals each row alone (tokens identical, logits within 1e-4) at a 4+4 budget: H2O
    layers mask pads themselves, window layers get transformers' sliding mask."""
    model = make_model(family, attn)
    generator = torch.Generator().manual_seed(sum(lengths))
    seqs = [torch.randint(3, 100, (n,), generator=generator) for n in lengths]
    ids, mask = left_padded(seqs)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask,
                           past_key_values=H2OCache(model.config, heavy_budget=heavy, recent_budget=recent), **kw)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                               past_key_values=H2OCache(model.config, heavy_budget=heavy, recent_budget=recent), **kw)
        assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(s):]), f"row {i}"
        diff = max((b[i] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits, strict=True))
        assert diff < 1e-4, f"row {i}: {diff}"


def check_hybrid_beams(family: str, attn: str) -> None:
    """Beam search: at full budget the same beams as DynamicCache (window layers reorder too); at a 4+4 budget
    the H2O layers keep 8 tokens."""
    model = make_model(family, attn)
    kw = dict(max_new_tokens=10, num_beams=3, eos_token_id=None, return_dict_in_generate=True, pad_token_id=0,
              attention_mask=torch.ones(2, PROMPT, dtype=torch.long))
    ref = model.generate(prompt_ids(), past_key_values=DynamicCache(config=model.config), **kw)
    full = model.generate(prompt_ids(), past_key_values=H2OCache(model.config, heavy_budget=64, recent_budget=64),
                          **kw)
    assert torch.equal(full.sequences, ref.sequences)
    out = model.generate(prompt_ids(), past_key_values=H2OCache(model.config, heavy_budget=4, recent_budget=4), **kw)
    cache = out.past_key_values
    assert cache.tokens_kept() == (8 if cache._h2o_layers() else model.config.sliding_window - 1)
