"""Memory probes of the benchmarks: peak RSS (Linux ``/proc``) or CUDA peak, the copy bandwidth of the machine
(the roofline), the model's weight bytes and a description of the machine."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import time
from typing import Any

import torch

GiB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory() -> bool:
    """Free what can be freed and reset the peak counters; False when peak RSS cannot be reset here."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def memory_bandwidth(size_mib: int = 256, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """Copy microbenchmark: best of ``repeats`` ``dst.copy_(src)``; bandwidth counts bytes read + written."""
    n = size_mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"copy_mib": size_mib, "bandwidth_gb_s": 2 * n * 4 / best / 1e9, "best_copy_s": best}


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or p.device.type == "meta":
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def machine_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = os.cpu_count()
    desc = f"{cores}-core CPU ({platform.processor() or platform.machine()}), " + (f"GPU {gpu}" if gpu else "no GPU")
    return {"description": desc, "cpu_count": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
