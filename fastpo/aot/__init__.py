"""`fastpo aot`: compile every Triton and CUDA kernel for sm_80/sm_90 without a GPU and
check what a GPU would punish (spills, occupancy, load widths, in-place ordering,
instructions per element). See :mod:`fastpo.aot.triton_report` and
:mod:`fastpo.aot.cuda_report` for what is compiled and asserted."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

__all__ = ["run", "summary"]


def _versions() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    from .cuda_report import nvcc_path

    env["nvcc"] = nvcc_path()
    return env


def summary(rows: list[dict]) -> dict:
    """Counts per backend: rows, compiled, with violations, and the worst numbers."""
    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        sub = [r for r in rows if r["backend"] == backend]
        ipe = [r["instr_per_elem"] for r in sub if r["instr_per_elem"] is not None and r["dtype"] != "fp64"]
        out[backend] = {
            "rows": len(sub),
            "compiled": sum(bool(r["compiled"]) for r in sub),
            "with_violations": sum(bool(r["violations"]) for r in sub),
            "max_registers": max((r["registers"] for r in sub), default=0),
            "max_spill_bytes_non_fp64": max((r["spill_bytes"] for r in sub if r["dtype"] != "fp64"), default=0),
            "max_instr_per_elem_non_fp64": max(ipe, default=None),
        }
    return out


def run(archs: list[int], json_path: str | None = None, *, triton: bool = True, cuda: bool = True,
        python: str | None = None) -> tuple[list[dict], int]:
    """Both reports; returns (rows, number of rows with violations) and writes ``json_path``."""
    from . import cuda_report, triton_report

    rows, seconds = [], {}
    if triton:
        t0 = time.time()
        rows += triton_report.collect(archs, python=python)
        seconds["triton"] = round(time.time() - t0, 1)
    if cuda:
        t0 = time.time()
        rows += cuda_report.collect(archs)
        seconds["cuda"] = round(time.time() - t0, 1)
    bad = sum(bool(r["violations"]) for r in rows)
    if json_path:
        env = _versions()
        if python:  # the Triton rows come from that interpreter: record its versions
            import subprocess

            got = subprocess.run([python, "-c", "import triton, torch, platform; "
                                  "print(triton.__version__, torch.__version__, platform.python_version())"],
                                 capture_output=True, text=True)
            parts = got.stdout.split() if got.returncode == 0 else []
            env["triton_python"] = python
            env["triton_python_versions"] = dict(zip(("triton", "torch", "python"), parts)) or None
            env["triton"] = parts[0] if parts else None
        payload = {"environment": env, "archs": archs, "seconds": seconds, "summary": summary(rows), "rows": rows}
        Path(json_path).write_text(json.dumps(payload, indent=1))
    return rows, bad
