"""Timing and peak-memory measurement shared by `fastpo bench` and bench/.

Time: median over repetitions (CUDA events on GPU, perf_counter on CPU).
Peak extra memory: the peak of bytes held by torch's allocator during one call,
above what it held before (inputs are not counted; outputs and gradients are).
On CUDA from the caching allocator's statistics; on CPU from the allocation and
free events that torch's profiler records (``profile_memory=True``), summed in
time order. Both count tensors only, which is where every N x V buffer lives.
(The process's peak RSS was tried first and rejected: page faults taken by
OpenMP worker threads reach the counters late, so peaks were sometimes missed.)
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable

import torch

@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep the tables clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
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
    return _cpu_peak_bytes(fn)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds."""
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
