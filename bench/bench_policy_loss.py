"""policy_loss forward + backward: naive torch PPO, TRL (if installed), composed fastpo, every
fastpo backend fused (and with the in-place backward)."""
import pytest
import torch

from fastpo.benchmarks.policy_loss import cases
from conftest import run_benchmark

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = list(cases(_DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.impl}-{c.dtype}-{c.shape}" for c in CASES])
def test_policy_loss(benchmark, case, device):
    run_benchmark(benchmark, case, device)
