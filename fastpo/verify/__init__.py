"""`fastpo verify`: every op x backend x dtype against the float64 reference.

Each module in this package (one per op, named after it) exposes
``checks(device) -> Iterable[Check]``; the runner discovers them, so adding an op
never edits this file. An error is the norm-wise max relative error
``max|a - ref| / max|ref|`` against the float64 reference computed on the same
(upcast) inputs.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Check:
    op: str
    backend: str
    dtype: str
    shape: str
    quantity: str  # e.g. "logp", "entropy", "grad"
    error: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.error == self.error and self.error <= self.tol  # NaN fails


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def op_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def run_checks(device: str, ops: Iterable[str] | None = None) -> list[Check]:
    results: list[Check] = []
    for name in op_modules():
        if ops and name not in ops:
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        results.extend(module.checks(torch.device(device)))
    return results


def as_records(checks: list[Check]) -> list[dict]:
    return [dict(asdict(c), passed=c.passed) for c in checks]
