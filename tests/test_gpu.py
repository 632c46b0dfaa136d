"""H2O on CUDA: sdpa in fp32 and FlashAttention-2 in half precision. Skipped without CUDA (and without flash-attn
for the FlashAttention tests); CI has no GPU.

FlashAttention needs fp16/bf16, and H2O's decode step computes attention with its own matmuls (it must see the
probabilities), so the flash checks compare logits teacher-forced (the same token sequence fed to both caches)
with a half-precision tolerance instead of asking greedy decoding to pick the same argmax at every near-tie.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from fixtures import (
    NEW,
    PROMPT,
    eager_reference,
    greedy,
    left_padded,
    make_model,
    max_logit_diff,
    prompt_ids,
    teacher_forced_logits,
)
from transformers import DynamicCache

from h2o_cache import H2OCache
from h2o_cache.compat import cache_kwargs, output_cache
from h2o_cache.scoring import attention_with_mass, mass_from_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
HALF_ATOL = 3e-2  # logits of the tiny random models are O(1); fp16 rounding over 2 layers stays well below this


def test_scoring_on_cuda_matches_eager():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 33, 16, device="cuda")
    k, v = torch.randn(2, 2, 40, 16, device="cuda"), torch.randn(2, 2, 40, 16, device="cuda")
    out, mass = attention_with_mass(q, k, v, scaling=0.25, chunk_size=8)
    ref_out, probs = eager_reference(q.cpu(), k.cpu(), v.cpu(), 0.25)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.cpu(), mass_from_weights(probs, 2, None, "mean"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_sdpa_fp32_exact_at_full_budget_and_evicts_at_20_percent(family):
    model = make_model(family, "sdpa").cuda()
    ids = prompt_ids().cuda()
    ref = greedy(model, ids, **cache_kwargs(DynamicCache(config=model.config)))
    full_budget = H2OCache(model.config, heavy_budget=PROMPT + NEW, recent_budget=PROMPT + NEW)
    full = greedy(model, ids, **cache_kwargs(full_budget))
    assert torch.equal(full.sequences, ref.sequences)
    assert max_logit_diff(full, ref) < 1e-4  # TF32 matmuls may be on; CPU reaches 1e-5

    out = greedy(model, ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})
    cache = output_cache(out)
    assert cache.tokens_kept() == 8 and all(layer.keys.device.type == "cuda" for layer in cache.layers)
    assert all(torch.isfinite(step).all() for step in out.logits)


@needs_flash
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attention_2_full_budget_matches_dynamic_cache(dtype):
    model = make_model("llama", "flash_attention_2", dtype).cuda()
    ids, continuation = prompt_ids().cuda(), prompt_ids(length=NEW, seed=2).cuda()
    ref = teacher_forced_logits(model, ids, continuation, DynamicCache(config=model.config))
    cache = H2OCache(model.config, heavy_budget=PROMPT + NEW, recent_budget=PROMPT + NEW)
    got = teacher_forced_logits(model, ids, continuation, cache)
    assert cache.layers[0].evicted == 0
    assert cache.layers[0].scores.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=HALF_ATOL, rtol=0)


@needs_flash
def test_flash_attention_2_evicts_during_decoding():
    model = make_model("llama", "flash_attention_2", torch.float16).cuda()
    ids = prompt_ids().cuda()
    out = greedy(model, ids, cache_implementation="h2o", cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1})
    cache = output_cache(out)
    assert cache.budget() == 8 and cache.tokens_kept() == 8
    assert cache.get_seq_length() == PROMPT + NEW - 1
    ref = greedy(model, ids, new_tokens=1, **cache_kwargs(DynamicCache(config=model.config)))
    # The prompt is attended in full by flash's own kernel before anything is evicted.
    torch.testing.assert_close(out.logits[0].float(), ref.logits[0].float(), atol=HALF_ATOL, rtol=0)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert all(torch.isfinite(layer.scores).all() for layer in cache.layers)


@needs_flash
def test_flash_attention_2_left_padded_row_equals_the_row_alone():
    model = make_model("llama", "flash_attention_2", torch.float16).cuda()
    long_row = prompt_ids(1)[0]
    short_row = long_row[-9:]
    ids, mask = (t.cuda() for t in left_padded([long_row, short_row]))
    budgets = dict(heavy_budget=PROMPT + NEW, recent_budget=PROMPT + NEW)
    cache = H2OCache(model.config, **budgets)
    with torch.inference_mode():
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                output_logits=True, return_dict_in_generate=True, **cache_kwargs(cache))
    continuation = padded.sequences[1:, PROMPT:-1]
    alone = teacher_forced_logits(model, short_row[None].cuda(), continuation, H2OCache(model.config, **budgets))
    torch.testing.assert_close(torch.stack(padded.logits, 1)[1:].float(), alone, atol=HALF_ATOL, rtol=0)
    # Padding is recorded as invalid and never scores.
    pads = PROMPT - len(short_row)
    for layer in cache.layers:
        assert not layer.valid[1, :, :pads].any()
        assert (layer.scores[1, :, :pads] == 0).all()
