"""`fastpo verify` covers the fused linear ops: every check passes on this machine's backends,
for every dtype (a failing check here is a numerics regression of the linear ops)."""
from __future__ import annotations

from fastpo.verify import run_checks


def test_linear_checks_pass():
    checks = run_checks("cpu", ["linear"])
    ops = {c.op for c in checks}
    assert ops == {"linear_token_logprobs", "linear_policy_loss"}
    assert {c.dtype for c in checks} == {"float32", "bfloat16", "float16"}
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
