"""Timing and peak-memory measurement shared by `fastpo bench` and bench/.

Time: median over repetitions (CUDA events on GPU, perf_counter on CPU).
Peak extra memory: bytes allocated during one call beyond what existed before it
(inputs are not counted; outputs and gradients are). On CUDA from the caching
allocator's peak statistics; on Linux CPU from the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) with glibc told to serve every
allocation above 64 KiB by mmap, so freed buffers leave the resident set at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import sys
import time
from typing import Callable

import torch

_MMAP_SET = False


def _mmap_large_allocations() -> None:
    global _MMAP_SET
    if _MMAP_SET or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, disables glibc's dynamic raise
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass
    _MMAP_SET = True


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated while ``fn`` runs, above the allocation before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return peak - base
    if not cpu_memory_supported():
        return None
    _mmap_large_allocations()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _proc_kib("VmRSS")
    out = fn()
    peak = _proc_kib("VmHWM")
    del out
    return max(0, peak - base) * 1024


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    _mmap_large_allocations()
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
