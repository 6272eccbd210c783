"""`fastpo verify` runs a 2-process gloo check of the vocabulary-parallel ops (sharded vs
unsharded token_logprobs and linear_token_logprobs); every check passes."""
from __future__ import annotations

from fastpo.verify import run_checks


def test_vocab_parallel_checks_pass():
    checks = run_checks("cpu", ["vocab_parallel"])
    assert {c.op for c in checks} == {"token_logprobs (gloo x2)", "linear_token_logprobs (gloo x2)"}
    assert len(checks) == 12
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
