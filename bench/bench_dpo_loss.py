"""dpo_loss forward + backward: naive torch, each fastpo backend; lm_head + DPO: naive, Liger (if installed), fastpo."""
import pytest
import torch

from fastpo.benchmarks.dpo_loss import cases
from conftest import run_benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = list(cases(_DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.impl}-{c.dtype}-{c.shape}" for c in CASES])
def test_dpo_loss(benchmark, case, device):
    run_benchmark(benchmark, case, device)
