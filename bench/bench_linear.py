"""The fused lm_head ops from hidden states, forward + backward: naive matmul + log_softmax,
fastpo on every backend, TRL's ChunkedLogProbFunction and Liger's fused linear losses (if
installed), and torch's 3 GEMMs alone for reference (`fastpo bench --ops linear`'s cases)."""
import pytest
import torch

from fastpo.benchmarks.linear import cases
from conftest import run_benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = list(cases(_DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.impl}-{c.dtype}-{c.shape}" for c in CASES])
def test_linear(benchmark, case, device):
    run_benchmark(benchmark, case, device)
