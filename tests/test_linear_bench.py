"""The fused-linear benchmark module's cases run at a tiny shape and give finite gradients."""
import math

import torch

from fastpo.benchmarks import linear


def test_linear_cases_run_tiny():
    cases = list(linear.cases(torch.device("cpu"), [(16, 8, 37, torch.float32)]))
    impls = {(c.op, c.impl) for c in cases}
    for op in linear.OPS:
        assert (op, "torch-naive") in impls and (op, "fastpo[cpu]") in impls and (op, "torch-matmul-3gemm") in impls
    for case in cases:
        assert case.floor_bytes > 0 and case.reps >= 1
        grads = case.step()
        assert grads and all(torch.isfinite(g).all() for g in grads), (case.op, case.impl)
    # the fused rows agree with the naive one on the gradient of hidden and weight
    by = {(c.op, c.impl): c.step() for c in cases if c.impl in ("torch-naive", "fastpo[cpu]")}
    for op in linear.OPS:
        for g_naive, g_fused in zip(by[(op, "torch-naive")], by[(op, "fastpo[cpu]")]):
            assert torch.allclose(g_naive, g_fused, atol=1e-5, rtol=1e-4), op
    assert math.isfinite(sum(c.floor_bytes for c in cases))
