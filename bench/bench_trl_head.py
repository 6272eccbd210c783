"""TRL 1.16's fused LM head (`ChunkedLogProbFunction`) against the fastpo-served one, forward +
backward with random upstream weights on each output (`fastpo bench --ops trl_head`'s cases;
needs trl)."""
import pytest
import torch

pytest.importorskip("trl")
from fastpo.benchmarks.trl_head import cases  # noqa: E402
from conftest import run_benchmark  # noqa: E402

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = list(cases(_DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.impl}-{c.dtype}-{c.shape}" for c in CASES])
def test_trl_head(benchmark, case, device):
    run_benchmark(benchmark, case, device)
