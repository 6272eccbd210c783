"""sequence_logprobs forward + backward: naive torch and every fastpo backend."""
import pytest
import torch

from fastpo.benchmarks.sequence_logprobs import cases
from conftest import run_benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = list(cases(_DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.impl}-{c.dtype}-{c.shape}" for c in CASES])
def test_sequence_logprobs(benchmark, case, device):
    run_benchmark(benchmark, case, device)
