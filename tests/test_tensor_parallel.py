"""Past one process: transformers' tensor parallelism and Accelerate's device maps under an H2OCache.

The TP test launches ``torch.distributed.run --nproc-per-node 2`` (gloo, CPU) once on tiny saved Llamas and
checks, on every rank: tokens identical to one process at full budget and at 20%, and each rank's ``kv_bytes()``
exactly half of the single-process cache (each rank holds its own KV heads). Where TP cannot split the KV heads
(MQA: 1 head; 3 heads on 2 ranks) transformers itself fails in ``k_proj(...).view``; the test pins that H2O
fails the same way as the default cache, so nothing H2O-specific hides or changes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from h2o_cache import H2OCache
from h2o_cache.compat import cache_kwargs

_WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from h2o_cache import H2OCache
    from h2o_cache.compat import cache_kwargs

    def generate(model, ids, budget):
        cache = H2OCache(model.config, heavy_ratio=budget / 2, recent_ratio=budget / 2)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=8,
                             do_sample=False, return_dict_in_generate=True)
        return out.sequences[:, ids.shape[1]:].tolist(), cache.kv_bytes(), list(cache.layers[0].keys.shape)

    out_dir, folders = sys.argv[1], sys.argv[2:]
    results = {}
    for folder in folders:
        torch.manual_seed(0)
        ids = torch.randint(3, 128, (2, 40))
        single = AutoModelForCausalLM.from_pretrained(folder).eval()
        sharded = AutoModelForCausalLM.from_pretrained(
            folder, distributed_config=DistributedConfig(tp_plan="auto")).eval()
        per_budget = {}
        for budget in (1.0, 0.2):
            tokens, kv_bytes, shape = generate(single, ids, budget)
            try:
                tp_tokens, tp_bytes, tp_shape = generate(sharded, ids, budget)
            except RuntimeError as err:
                try:
                    sharded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
                    default_error = None
                except RuntimeError as err2:
                    default_error = str(err2)
                per_budget[str(budget)] = {"h2o_error": str(err), "default_error": default_error}
                continue
            per_budget[str(budget)] = {"same": tokens == tp_tokens, "bytes": kv_bytes, "tp_bytes": tp_bytes,
                                       "shape": shape, "tp_shape": tp_shape}
        results[os.path.basename(folder)] = per_budget
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
''')


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo")
def test_tensor_parallel_two_ranks_matches_one_process(tmp_path):
    shapes = {"gqa": dict(num_key_value_heads=2),  # 2 KV heads on 2 ranks: one each
              "mqa": dict(num_key_value_heads=1),  # 1 KV head cannot be split
              "kv3": dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)}  # uneven (like SmolLM2)
    folders = []
    for name, overrides in shapes.items():
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
         str(tmp_path), *folders],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for budget in ("1.0", "0.2"):
            gqa = results["gqa"][budget]
            assert gqa["same"], f"rank {rank}, budget {budget}: TP tokens differ from one process"
            assert gqa["tp_bytes"] * 2 == gqa["bytes"]
            assert gqa["tp_shape"][1] == 1 and gqa["shape"][1] == 2  # KV heads per rank
            for name in ("mqa", "kv3"):
                failed = results[name][budget]
                assert "is invalid for input of size" in failed["h2o_error"]
                assert failed["default_error"] == failed["h2o_error"]
        assert results["gqa"]["0.2"]["tp_shape"][2] < results["gqa"]["1.0"]["tp_shape"][2]  # 20% evicts


def test_accelerate_disk_offload_device_map(tmp_path):
    """A device map that offloads a decoder layer to disk (meta weights, loaded per forward): each cache layer
    is created where its layer's keys arrive, and tokens match the plain model at full budget and at 20%."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    for budget in (1.0, 0.2):
        runs = []
        for model in (plain, offloaded):
            cache = H2OCache(model.config, heavy_ratio=budget / 2, recent_ratio=budget / 2)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache),
                                 max_new_tokens=8, do_sample=False)
            runs.append((out[:, ids.shape[1]:], cache))
        assert torch.equal(runs[0][0], runs[1][0])
        assert all(layer.keys.device.type == "cpu" for layer in runs[1][1].layers)
        assert runs[0][1].kv_bytes() == runs[1][1].kv_bytes()
