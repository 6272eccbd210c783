"""pytest-benchmark harness over fastpo.benchmarks: the same cases `fastpo bench` runs.

Run: ``pytest bench/ --benchmark-only`` (add ``--benchmark-json=out.json`` to keep results).
Each benchmark records its byte model, GB/s and peak extra memory in ``extra_info``.
"""
import fastpo  # noqa: F401  (sets up the Triton interpreter before triton is imported)
import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_benchmark(benchmark, case, device):
    from fastpo.benchmarks._measure import peak_extra_bytes

    mem = peak_extra_bytes(case.step, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        case.step()
        sync()

    benchmark.pedantic(step, rounds=case.reps, iterations=1, warmup_rounds=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=case.op, impl=case.impl, dtype=case.dtype, shape=case.shape, note=case.note,
        floor_bytes=case.floor_bytes, floor_gbps=case.floor_bytes / median_s / 1e9,
        peak_extra_mib=None if mem is None else mem / 2**20,
    )
