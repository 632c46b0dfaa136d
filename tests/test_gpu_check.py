"""The `make gpu-check` benchmark script: its CPU smoke run and its no-CUDA exit (the GPU figures need a GPU)."""

from __future__ import annotations

import pytest
import torch

from h2o_cache.eval import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_skips_cleanly(capsys):
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == "skipped: needs CUDA"


def test_cpu_smoke_prints_a_row_per_system_and_context(capsys):
    argv = ["--cpu-smoke", "--contexts", "24,40", "--steps", "2", "--warmup", "1",
            "--systems", "full,h2o-torch,h2o-fused"]
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["24"], ["40"])]
    assert [r[:2] for r in rows] == [[c, s] for c in ("24", "40") for s in ("full", "h2o-torch", "h2o-fused")]
    for r in rows:
        if r[1] == "h2o-fused":
            assert r[2] == "skipped:"  # the kernel is the CUDA path
        else:
            assert float(r[2]) > 0 and float(r[4]) > 0  # tok/s, GB read per step
    # The H2O cache at 20% holds fewer bytes than the full cache at the same context.
    by = {(r[0], r[1]): r for r in rows}
    assert float(by[("40", "h2o-torch")][4]) < float(by[("40", "full")][4])


def test_bad_arguments_rejected():
    with pytest.raises(SystemExit):
        gpu_check.main(["--systems", "full,nope"])
    with pytest.raises(SystemExit):
        gpu_check.main(["--budget", "0"])
