"""Quantised H2O storage (``kv_bits``): the packed decode step, byte accounting, and every workload with it on."""

from __future__ import annotations

import pytest
import torch
from fixtures import FAMILIES, left_padded, make_model, prompt_ids, teacher_forced_logits
from transformers import DynamicCache

from h2o_cache import H2OCache, H2OConfig, prefill_in_micro_batches
from h2o_cache.compat import cache_kwargs
from h2o_cache.quantized import QuantizedH2OLayer, packed_decode_attention
from h2o_cache.scoring import attention_with_mass

Q4 = dict(kv_bits=4, kv_group_size=4, kv_residual=2)  # tiny models have head_dim 16
H, R = 4, 4


def step(layer, q, k, v, scaling=0.25):
    """One step of a bare layer as h2o_attention runs it (no model): store, attend, score, evict."""
    layer.update(k, v)
    layer.mark_new_tokens_valid(None)
    if layer.packed_slots:
        out, mass = packed_decode_attention(layer, q, scaling=scaling)
    else:
        out, mass = attention_with_mass(q, layer.keys, layer.values, scaling=scaling)
    layer.awaiting_attention = False
    layer.after_attention(mass)
    return out, mass


def dequantized(layer):
    p = layer.packed_slots
    return (torch.cat([layer.dequantized_keys(0, p), layer.keys.float()], dim=2),
            torch.cat([layer.dequantized_values(0, p), layer.values.float()], dim=2))


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("policy", ["h2o", "keep_all"])
def test_packed_decode_equals_attention_over_the_dequantised_cache(axis, policy):
    config = H2OConfig(heavy_budget=10, recent_budget=6, policy=policy, kv_key_axis=axis, **Q4)
    layer = QuantizedH2OLayer(config, 0)
    gen = torch.Generator().manual_seed(0)
    step(layer, torch.randn(2, 4, 30, 16, generator=gen), torch.randn(2, 2, 30, 16, generator=gen),
         torch.randn(2, 2, 30, 16, generator=gen))
    for _ in range(12):
        q, k, v = (torch.randn(2, n, 1, 16, generator=gen) for n in (4, 2, 2))
        layer.update(k, v)
        assert layer.packed_slots > 0
        keys, values = dequantized(layer)
        ref_out, ref_mass = attention_with_mass(q, keys, values, scaling=0.25, need_mass=True)
        out, mass = packed_decode_attention(layer, q, scaling=0.25)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass, ref_mass, atol=1e-6, rtol=1e-5)
        layer.awaiting_attention = False
        layer.after_attention(mass)
        # The residual holds the newest tokens in order; the rest stays within the budget.
        p, n = layer.packed_slots, layer.residual
        if policy == "h2o":
            assert layer.stored == 16 and layer.keys.shape[-2] == n + 1
            newest = torch.arange(layer.seen - n, layer.seen, dtype=torch.int32)
            assert (layer.positions[:, :, p : p + n] == newest).all()
        else:
            assert layer.stored == layer.seen


def test_padding_chosen_inside_the_residual_takes_the_full_precision_path():
    """A victim past the mover (padding inside the residual) is evicted through the base layer's slots, and the
    layout (packed, then the newest tokens in order) is rebuilt."""
    config = H2OConfig(heavy_budget=4, recent_budget=4, kv_key_axis="token", **{**Q4, "kv_residual": 3})
    layer = QuantizedH2OLayer(config, 0)
    gen = torch.Generator().manual_seed(4)
    step(layer, torch.randn(1, 1, 12, 16, generator=gen), torch.randn(1, 1, 12, 16, generator=gen),
         torch.randn(1, 1, 12, 16, generator=gen))
    p = layer.packed_slots
    layer.valid = torch.ones(1, 1, layer._num_slots(), dtype=torch.bool)
    layer.valid[0, 0, p + 2] = False  # as if the residual's second token were padding
    padded_position = int(layer.positions[0, 0, p + 2])
    _, mass = step(layer, torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen),
                   torch.randn(1, 1, 1, 16, generator=gen))
    assert layer.packed_slots == p and layer.stored == 8
    kept = layer.positions[0, 0, :8].tolist()
    assert padded_position not in kept and len(set(kept)) == 8
    assert layer.positions[0, 0, p : p + 3].tolist() == sorted(kept)[-3:]


def test_moved_tokens_are_stored_as_their_quantised_values():
    """A decode step's mover lands in the victim's slot as its own quantisation (per-token axis)."""
    config = H2OConfig(heavy_budget=6, recent_budget=2, policy="local", kv_key_axis="token", **Q4)
    layer = QuantizedH2OLayer(config, 0)
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(1, 1, 20, 16, generator=gen)
    step(layer, torch.randn(1, 1, 10, 16, generator=gen), kv[:, :, :10], kv[:, :, :10] * 2)
    for t in range(10, 20):
        step(layer, torch.randn(1, 1, 1, 16, generator=gen), kv[:, :, t : t + 1], kv[:, :, t : t + 1] * 2)
    keys, values = dequantized(layer)
    order = layer.positions[0, 0, : layer.stored].long()
    assert sorted(order.tolist()) == list(range(12, 20))  # local: the newest 8
    original = kv[0, 0, order]
    steps = layer.key_scale.float().amax()
    assert (keys[0, 0, : layer.stored] - original).abs().max() <= steps / 2 + 1e-6
    assert (values[0, 0, : layer.stored] - 2 * original).abs().max() <= layer.value_scale.float().amax() / 2 + 1e-6


@pytest.mark.parametrize("slot", [1, 5], ids=["whole-group", "partial-group"])
@pytest.mark.parametrize("outside", [False, True])
def test_per_channel_groups_widen_to_cover_a_mover_and_keep_their_members(slot, outside):
    """A token written into a packed slot joins that slot's key group: a grid that covers it stays as it was (so do
    the other members' codes); otherwise the grid widens and the members move by at most half a new step."""
    config = H2OConfig(heavy_budget=7, recent_budget=1, kv_bits=4, kv_group_size=4, kv_residual=1)
    layer = QuantizedH2OLayer(config, 0)
    gen = torch.Generator().manual_seed(2)
    step(layer, torch.randn(1, 1, 12, 16, generator=gen), torch.randn(1, 1, 12, 16, generator=gen),
         torch.randn(1, 1, 12, 16, generator=gen))
    assert layer.packed_slots == 7 and layer.key_scale.shape[2] == 2  # groups of 4 and 3 slots
    codes, before, scale = layer.qkeys.clone(), layer.dequantized_keys(0, 7), layer.key_scale.clone()
    group = range(slot // 4 * 4, min(slot // 4 * 4 + 4, 7))
    key = before[:, :, group[-1] if group[-1] != slot else group[0]][:, :, None] * (10.0 if outside else 1.0)
    layer._write_packed(torch.tensor([[[slot]]]), torch.tensor([[[True]]]), key, key)
    after, g = layer.dequantized_keys(0, 7), slot // 4
    half_step = layer.key_scale[0, 0, g].float() / 2 + 1e-5
    others = [i for i in group if i != slot]
    assert ((after[0, 0, slot] - key[0, 0, 0]).abs() <= half_step).all()
    assert ((after[0, 0, others] - before[0, 0, others]).abs() <= half_step).all()
    untouched = [i for i in range(7) if i not in group]
    assert torch.equal(layer.qkeys[0, 0, untouched], codes[0, 0, untouched])
    if outside:
        assert (layer.key_scale[0, 0, g].float() >= scale[0, 0, g].float()).all()
        assert (layer.key_scale[0, 0, g] > scale[0, 0, g]).any()
    else:
        assert torch.equal(layer.key_scale, scale) and torch.equal(layer.qkeys[0, 0, others], codes[0, 0, others])


@pytest.mark.parametrize("bits, ratio", [(2, 0.1875), (4, 0.3125), (8, 0.5625)])
def test_kv_bytes_count_codes_params_and_bookkeeping(bits, ratio):
    """keep_all at head_dim 64, groups of 32: codes are bits/16 of fp16 and the 16-bit parameters add 1/16."""
    layer = QuantizedH2OLayer(H2OConfig(policy="keep_all", kv_bits=bits, kv_group_size=32, kv_residual=0), 0)
    k = torch.randn(2, 3, 64, 64, dtype=torch.float16)
    step(layer, torch.randn(2, 3, 64, 64, dtype=torch.float16), k, k)
    assert layer.packed_slots == 64 and layer.keys.shape[-2] == 0
    fp16 = 2 * k.numel() * 2
    by_kind = layer.kv_bytes_by_kind()
    assert by_kind == {"keys": k.numel() * bits // 8, "values": k.numel() * bits // 8,
                       "quant_params": 2 * 3 * (2 * 64 + 64 * 2) * 2 * 2, "bookkeeping": 0}
    assert layer.kv_bytes() == sum(by_kind.values()) == fp16 * ratio
    # A full-precision residual and H2O's bookkeeping are counted too.
    layer = QuantizedH2OLayer(H2OConfig(heavy_budget=20, recent_budget=20, kv_bits=bits, kv_group_size=32,
                                        kv_residual=8), 0)
    step(layer, torch.randn(2, 3, 64, 64), k.float(), k.float())
    assert layer.packed_slots == 32 and layer.keys.shape[-2] == 9  # 40 kept = 32 packed + 8 residual, + scratch
    by_kind = layer.kv_bytes_by_kind()
    assert by_kind["keys"] == 2 * 3 * (32 * 64 * bits // 8 + 9 * 64 * 4)
    assert by_kind["bookkeeping"] == 2 * 3 * 41 * (4 + 4)  # float32 scores, int32 positions


def test_cache_reports_bytes_by_kind_and_keep_all_has_no_budget():
    model = make_model("llama")
    cache = H2OCache(model.config, policy="keep_all", **Q4)
    with torch.no_grad():
        model(prompt_ids(2, 30), **cache_kwargs(cache))
    stats = cache.stats()
    assert stats["kv_bits"] == 4 and cache.budget() is None and stats["recent"] is None
    assert stats["tokens_kept"] == 30 and sum(stats["bytes"].values()) == stats["kv_bytes"] == cache.kv_bytes()


def test_keep_all_matches_dynamic_cache_exactly_unquantised_and_closely_at_8_bits():
    model = make_model("llama")
    ids = prompt_ids(2, 30)
    with torch.no_grad():
        ref_ids = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    cont = ref_ids[:, 30:]
    ref = teacher_forced_logits(model, ids, cont, DynamicCache())
    plain = teacher_forced_logits(model, ids, cont, H2OCache(model.config, policy="keep_all"))
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    q8 = teacher_forced_logits(model, ids, cont, H2OCache(model.config, policy="keep_all", kv_bits=8,
                                                          kv_group_size=4, kv_residual=2))
    q4 = teacher_forced_logits(model, ids, cont, H2OCache(model.config, policy="keep_all", **Q4))
    err8, err4 = (q8 - ref).abs().max().item(), (q4 - ref).abs().max().item()
    assert 0 < err8 < 0.02 and err8 < err4 / 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("options", [dict(heavy_budget=H, recent_budget=R, **Q4),
                                     dict(policy="keep_all", kv_key_axis="token", **Q4)], ids=["h2o", "keep_all"])
def test_left_padded_batch_equals_each_row_alone(attn, options):
    """Pads never share a quantisation group with real tokens: evicted first (h2o), or per-token groups."""
    model = make_model("llama", attn)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 100, (n,), generator=gen) for n in (30, 21, 12)]
    ids, mask = left_padded(seqs)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, past_key_values=H2OCache(model.config, **options), **kw)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], past_key_values=H2OCache(model.config, **options), **kw)
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(s) :]), f"row {i}"
        diff = max((b[i] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits, strict=True))
        assert diff < 1e-4, f"row {i}: {diff}"


def test_beam_search_scores_equal_each_beam_fed_alone():
    model = make_model("llama")
    ids = prompt_ids()
    new = lambda: H2OCache(model.config, heavy_budget=H, recent_budget=R, **Q4)  # noqa: E731
    out = model.generate(ids, max_new_tokens=12, num_beams=3, num_return_sequences=3, length_penalty=0.0,
                         eos_token_id=None, output_scores=True, return_dict_in_generate=True, past_key_values=new())
    for row in range(6):
        tokens = out.sequences[row, ids.shape[1] :]
        logits = teacher_forced_logits(model, ids[row // 3][None], tokens[None, :-1], new())[0]
        total = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).sum()
        assert abs(total.item() - out.sequences_scores[row].item()) < 1e-4


def test_sampling_copies_carry_their_packed_state():
    model = make_model("llama")
    ids = prompt_ids()
    new = lambda: H2OCache(model.config, heavy_budget=H, recent_budget=R, **Q4)  # noqa: E731
    torch.manual_seed(3)
    out = model.generate(ids, max_new_tokens=10, do_sample=True, num_return_sequences=2, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True, past_key_values=new())
    logits = torch.stack(out.logits, dim=1)
    for row in range(4):
        forced = teacher_forced_logits(model, ids[row // 2][None], out.sequences[row, 40:-1][None], new())[0]
        assert (forced - logits[row]).abs().max() < 1e-4


def test_micro_batched_prefill_and_concatenate_equal_the_whole_batch():
    model = make_model("llama")
    ids, mask = left_padded([prompt_ids(1, 40, seed=s)[0][: 40 - 3 * s] for s in range(4)])
    new = lambda: H2OCache(model.config, heavy_budget=H, recent_budget=R, **Q4)  # noqa: E731
    whole = new()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **cache_kwargs(whole)).logits[:, -1]
    cache, logits = prefill_in_micro_batches(model, ids, new, micro_batch=2, attention_mask=mask)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache.layers, whole.layers, strict=True):
        assert a.packed_slots == b.packed_slots > 0
        for name in a._tensor_names():
            x, y = getattr(a, name), getattr(b, name)
            if x.is_floating_point() and name not in ("key_scale", "key_zero", "value_scale", "value_zero"):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
            elif name not in ("qkeys", "qvalues"):  # a code may round the other way on a 1e-7 difference
                torch.testing.assert_close(x.float(), y.float(), atol=1e-3, rtol=1e-3)
    kw = dict(attention_mask=torch.cat([mask, mask.new_ones(4, 1)], 1), max_new_tokens=6, do_sample=False,
              eos_token_id=None)
    nxt = ref.argmax(-1, keepdim=True)
    a = model.generate(torch.cat([ids, nxt], 1), **cache_kwargs(cache), **kw)
    b = model.generate(torch.cat([ids, nxt], 1), **cache_kwargs(whole), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["h2o", "keep_all"])
def test_chunked_prefill_and_a_continued_conversation(policy):
    """Several tokens after the packed region exists: it is unpacked, extended and packed again."""
    model = make_model("llama")
    ids = prompt_ids(2, 60)
    cache = H2OCache(model.config, policy=policy, heavy_budget=12, recent_budget=12, prompt_length=60,
                     kv_bits=8, kv_group_size=4, kv_residual=2)
    ref = DynamicCache()
    with torch.no_grad():
        for start in range(0, 60, 16):
            out = model(ids[:, start : start + 16], **cache_kwargs(cache))
            full = model(ids[:, start : start + 16], **cache_kwargs(ref))
            assert cache.layers[0].packed_slots > 0
        for t in range(8):  # decode, then a second "turn" of 7 tokens, then decode again
            chunk = prompt_ids(2, 7 if t == 4 else 1, seed=t)
            out = model(chunk, **cache_kwargs(cache))
            full = model(chunk, **cache_kwargs(ref))
    if policy == "keep_all":  # 8-bit codes stay close to the full cache through every unpack/repack
        assert (out.logits - full.logits).abs().max() < 0.02
        assert cache.tokens_kept() == cache.get_seq_length() == 60 + 7 + 7
    else:
        assert cache.tokens_kept() == 24 and torch.isfinite(out.logits).all()
        layer = cache.layers[1]
        p, n = layer.packed_slots, layer.residual
        assert (layer.positions[:, :, p : p + n] == torch.arange(layer.seen - n, layer.seen)).all()


def test_long_generation_keeps_a_constant_size_and_moves_every_tensor_on_reorder():
    model = make_model("llama")
    cache = H2OCache(model.config, heavy_budget=H, recent_budget=R, **Q4)
    sizes = set()
    with torch.no_grad():
        model(prompt_ids(3, 20), **cache_kwargs(cache))
        for t in range(30):
            model(prompt_ids(3, 1, seed=t), **cache_kwargs(cache))
            sizes.add(cache.kv_bytes())
    assert len(sizes) == 1
    layer = cache.layers[1]
    before = {n: getattr(layer, n).clone() for n in layer._tensor_names() if getattr(layer, n) is not None}
    assert {"qkeys", "key_scale", "value_zero", "positions"} <= set(before)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for n, t in before.items():
        assert torch.equal(getattr(layer, n), t[[2, 0, 0]]), n


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_generates_with_4_bit_storage(family):
    """Prefill attends in full precision (its logits are the full cache's); decode reads packed bytes."""
    model = make_model(family)
    ids = prompt_ids()
    ref = model.generate(ids, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         past_key_values=DynamicCache(config=model.config), pad_token_id=0)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0, cache_implementation="h2o",
                         cache_config={"heavy_ratio": 0.1, "recent_ratio": 0.1, "kv_bits": 4, "kv_group_size": 8})
    cache = out.past_key_values
    assert cache.tokens_kept() == 8 and all(layer.packed_slots > 0 for layer in cache.layers)
    assert (out.logits[0] - ref.logits[0]).abs().max() < 1e-5
    assert all(torch.isfinite(s).all() for s in out.logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = make_model("llama", dtype=dtype)
    out = model.generate(prompt_ids(), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True,
                         past_key_values=H2OCache(model.config, heavy_budget=H, recent_budget=R, **Q4))
    layer = out.past_key_values.layers[0]
    assert layer.keys.dtype == dtype and layer.key_scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16
                                                                   else torch.float16)
    assert all(torch.isfinite(s).all() for s in out.logits)


@pytest.mark.parametrize("options, match", [
    (dict(kv_bits=3), r"kv_bits=3 is not supported; choose one of \[2, 4, 8\]"),
    (dict(kv_bits=True), "kv_bits"),
    (dict(kv_bits=4.0), "kv_bits"),
    (dict(kv_group_size=0), "kv_group_size must be an integer >= 1"),
    (dict(kv_key_axis="row"), r"kv_key_axis='row' is not supported; choose one of \['channel', 'token'\]"),
    (dict(kv_residual=-1), "kv_residual must be an integer >= 0"),
    (dict(policy="keep"), "policy='keep' is not supported"),
])
def test_bad_options_name_the_parameter(options, match):
    with pytest.raises(ValueError, match=match):
        H2OCache(None, **options)
    with pytest.raises(ValueError, match=match):
        H2OConfig.from_dict(options)


def test_options_the_head_dimension_refuses_fail_at_the_first_update():
    model = make_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match="kv_group_size=5 must divide the model's head dimension 16"):
        model(prompt_ids(1, 8), **cache_kwargs(H2OCache(model.config, kv_bits=4, kv_group_size=5)))
    layer = QuantizedH2OLayer(H2OConfig(kv_bits=2, kv_group_size=3), 0)
    with pytest.raises(ValueError, match=r"kv_bits=2 packs 4 values a byte.*choose kv_bits among \[4, 8\]"):
        layer.update(torch.zeros(1, 1, 4, 6), torch.zeros(1, 1, 4, 6))
