"""Timing and peak-memory measurement shared by `fastpo bench` and bench/.

Time: median and p90 over at least 10 repetitions (CUDA events on GPU, perf_counter
on CPU); ``time_stats`` also counts the kernel's synchronous memory-compaction stalls
(/proc/vmstat ``compact_stall``) during the runs: a CPU p90 far above the median with a
non-zero count is transparent-huge-page compaction (issue 8, defect 12).
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
from dataclasses import dataclass
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


MIN_REPS = 10


@dataclass(frozen=True)
class TimeStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    compact_stalls: int | None  # /proc/vmstat compact_stall delta over the runs (None: not Linux)


def _compact_stalls() -> int | None:
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("compact_stall "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _p90(sorted_times: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    return sorted_times[min(len(sorted_times) - 1, max(0, -(-9 * len(sorted_times) // 10) - 1))]


def time_stats(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, reps: int = MIN_REPS,
               min_reps: int = MIN_REPS) -> TimeStats:
    """Wall time of ``fn`` over ``max(reps, min_reps)`` runs after ``warmup``: median, p90, min
    (ms). ``min_reps`` is lowered only for runs that are not speed results (the interpreter)."""
    reps = max(int(reps), int(min_reps), 1)
    for _ in range(warmup):
        fn()
    times = []
    stalls0 = _compact_stalls()
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
    stalls1 = _compact_stalls()
    times.sort()
    return TimeStats(
        median_ms=statistics.median(times), p90_ms=_p90(times), min_ms=times[0], runs=reps,
        compact_stalls=None if stalls0 is None or stalls1 is None else stalls1 - stalls0,
    )


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, reps: int = MIN_REPS) -> float:
    """Median wall time of ``fn`` in milliseconds (over at least 10 runs; see ``time_stats``)."""
    return time_stats(fn, device, warmup=warmup, reps=reps).median_ms
