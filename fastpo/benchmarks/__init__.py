"""`fastpo bench`: micro-benchmarks of every op against the torch reference and peers.

Each module in this package (one per op) exposes
``cases(device, shapes=None) -> Iterable[Case]``; the runner discovers them, times
each case (median and p90 over at least 10 runs), measures its peak extra memory, and converts time to GB/s
with the case's stated byte model. ``device_peak_gbps`` measures the device's
copy bandwidth so results can be read as a fraction of what the memory can do.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ._measure import MIN_REPS, median_ms, peak_extra_bytes, time_stats


@dataclass
class Case:
    op: str
    impl: str  # e.g. "torch-naive", "trl", "fastpo[triton]"
    dtype: str
    shape: str
    step: Callable[[], object]  # one forward + backward
    floor_bytes: int  # minimal traffic: read logits once + write the gradient once
    note: str = ""
    reps: int = MIN_REPS


@dataclass
class Result:
    op: str
    impl: str
    dtype: str
    shape: str
    median_ms: float
    p90_ms: float
    floor_gbps: float
    pct_of_peak: float | None
    peak_extra_mib: float | None
    note: str = ""
    extra: dict = field(default_factory=dict)


def floor_bytes(kept_rows: int, rows: int, vocab: int, itemsize: int) -> int:
    """Minimal traffic of a fused forward + backward: read every kept row of logits once
    and write the whole gradient once (ignored rows are never read, but get zeros)."""
    return (kept_rows + rows) * vocab * itemsize


def device_peak_gbps(device: torch.device, mib: int = 512) -> float:
    """Measured copy bandwidth of the device, GB/s, counting read + write bytes of
    ``dst.copy_(src)``. A copy also pays the write-allocate of ``dst``; an in-place
    kernel does not, so it can exceed 100 % of this figure."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, reps=7)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# run only when named (``fastpo bench --ops trl_head``): minutes per shape on a CPU
OPT_IN = ("trl_head",)


def op_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def run_case(case: Case, device: torch.device, peak_gbps: float | None) -> Result:
    # interpreter cases (reps < 10) are correctness-at-scale runs, not speed results
    stats = time_stats(case.step, device, warmup=1, reps=case.reps, min_reps=min(case.reps, MIN_REPS))
    ms = stats.median_ms
    mem = peak_extra_bytes(case.step, device)
    gbps = case.floor_bytes / (ms * 1e-3) / 1e9
    return Result(
        op=case.op, impl=case.impl, dtype=case.dtype, shape=case.shape, median_ms=ms, p90_ms=stats.p90_ms,
        floor_gbps=gbps, pct_of_peak=(100 * gbps / peak_gbps) if peak_gbps else None,
        peak_extra_mib=None if mem is None else mem / 2**20, note=case.note,
        extra={"runs": stats.runs, "min_ms": stats.min_ms, "compact_stalls": stats.compact_stalls},
    )


def collect_cases(device: torch.device, ops: Iterable[str] | None = None, shapes=None) -> list[Case]:
    cases: list[Case] = []
    for name in op_modules():
        if (ops and name not in ops) or (not ops and name in OPT_IN):
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        cases.extend(module.cases(device, shapes))
    return cases
