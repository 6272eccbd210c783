"""The served TRL head under DeepSpeed ZeRO-3, simulated: outside TRL's
``maybe_gather_lm_head_ctx`` the head's parameters hold an empty partition (``numel 0``), inside
it their full data, as ZeRO-3 does. TRL gathers only around its ``.apply`` call, so the backward
(the recompute's GEMMs, or ``dz @ W`` with the logits kept) must re-gather; fastpo's head must
then give TRL's own values and gradients (TRL's function under the same simulation) on both of
its routes (under ZeRO-3 it always takes the recompute route, which saves the parameters
themselves rather than a transpose that would pin the gathered weight), and without the re-gather the backward fails (the check can fail)."""
from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("trl")
import trl.trainer.utils as trl_utils  # noqa: E402
from trl.kernels import chunked_logprob as trl_kernel  # noqa: E402

from fastpo.integrations import trl_head  # noqa: E402
from test_integrations_trl import _head_inputs  # noqa: E402

ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class FakeZero3:
    """Partition parameters (data -> empty) and gather them back inside ``gather(...)``."""

    def __init__(self, *params):
        self.full = {id(p): p.data for p in params}
        self.gathers = 0
        for p in params:
            p.data = p.data.new_empty(0)

    @contextlib.contextmanager
    def gather(self, *params):
        params = [p for p in params if p is not None and id(p) in self.full]
        self.gathers += 1
        for p in params:
            p.data = self.full[id(p)]
        try:
            yield
        finally:
            for p in params:
                p.data = p.data.new_empty(0)


@pytest.fixture
def zero3(monkeypatch):
    monkeypatch.setattr(trl_head, "zero3_enabled", lambda: True)
    state = {}

    def install(*params):
        state["z"] = FakeZero3(*params)
        monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", state["z"].gather)
        return state["z"]

    return install


def _leaves(dtype, bias):
    hidden, weight, b, targets = _head_inputs(12, 16, 37, dtype, bias=bias, seed=3)
    weight = torch.nn.Parameter(weight.detach().clone())
    b = None if b is None else torch.nn.Parameter(b.detach().clone())
    return hidden, weight, b, targets


def _scored(fn, z, hidden, weight, bias, targets, outputs, softcap):
    """TRL's call pattern: the head gathered around ``.apply`` only; then the backward."""
    with z.gather(weight, bias):
        out = fn.apply(hidden, weight, bias, targets, 0.7, 32768, softcap, 1.0, outputs)
    assert weight.numel() == 0  # partitioned again before the backward runs
    n = hidden.shape[0]
    loss = (out[0] * torch.linspace(-1, 1, n)).sum() + (out[1] * torch.linspace(0.5, 2, n)).sum()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    return out, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("outputs,softcap", [(("entropy",), None), (ALL, None), (("entropy",), 30.0)],
                         ids=["logp-entropy", "all-outputs", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_zero3_backward_regathers_and_matches_trl(zero3, outputs, softcap, bias):
    hidden, weight, b, targets = _leaves(torch.float32, bias)
    z = zero3(*[t for t in (weight, b) if t is not None])
    ours, g_ours = _scored(trl_head.FastpoChunkedLogProb, z, hidden, weight, b, targets, outputs, softcap)
    assert z.gathers == 2  # the forward's, and the backward's own
    theirs, g_theirs = _scored(trl_kernel.ChunkedLogProbFunction, z, hidden, weight, b, targets, outputs, softcap)
    for o, t in zip(ours, theirs):
        assert (o is None) == (t is None)
        if o is not None:
            torch.testing.assert_close(o.float(), t.float(), rtol=1e-5, atol=1e-5)
    for go, gt in zip(g_ours, g_theirs):
        assert go.shape == gt.shape and go.abs().max() > 0
        torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-5)


def test_zero3_under_bf16_autocast_keeps_the_fp32_head(zero3):
    """TRL's ``cast_lm_head_to_fp32`` / autocast case: bf16 GEMMs on an fp32 head; no 16-bit
    copy of the head is saved for the backward (the op saves the fp32 parameter itself)."""
    hidden, weight, b, targets = _leaves(torch.float32, True)
    z = zero3(weight, b)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ours, g_ours = _scored(trl_head.FastpoChunkedLogProb, z, hidden, weight, b, targets, ALL, None)
        assert (tuple(weight.shape), torch.float32) in saved or ((37, 16), torch.float32) in saved
        assert ((37, 16), torch.bfloat16) not in saved and ((16, 37), torch.bfloat16) not in saved
        theirs, g_theirs = _scored(trl_kernel.ChunkedLogProbFunction, z, hidden, weight, b, targets, ALL, None)
    for o, t in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(o, t, rtol=2e-2, atol=2e-2)
    for go, gt in zip(g_ours, g_theirs):
        assert go.dtype == gt.dtype == torch.float32
        torch.testing.assert_close(go, gt, rtol=5e-2, atol=5e-2)


def test_without_regather_the_backward_sees_the_empty_partition(zero3, monkeypatch):
    hidden, weight, b, targets = _leaves(torch.float32, False)
    z = zero3(weight)
    monkeypatch.setattr(trl_head, "zero3_enabled", lambda: False)  # the wrapper off: no re-gather
    with pytest.raises(RuntimeError):
        _scored(trl_head.FastpoChunkedLogProb, z, hidden, weight, b, targets, ALL, None)


def test_no_grad_call_takes_no_second_gather(zero3):
    hidden, weight, b, targets = _leaves(torch.float32, True)
    z = zero3(weight, b)
    with torch.no_grad(), z.gather(weight, b):
        out = trl_head.FastpoChunkedLogProb.apply(hidden, weight, b, targets, 1.0, 32768, None, 1.0, ALL)
    assert z.gathers == 1 and not out[0].requires_grad


def test_zero3_frozen_head_needs_no_backward_gather(zero3):
    """PEFT under ZeRO-3 (frozen lm_head), log-probs only: the frozen-head path forms dL/dhidden's
    rows in the forward, so the backward gathers nothing, and matches TRL's function."""
    hidden, weight, b, targets = _leaves(torch.float32, True)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    z = zero3(weight, b)

    def run(fn):
        with z.gather(weight, b):
            lp = fn.apply(hidden, weight, b, targets, 0.7, 32768, None, 1.0, ())[0]
        return lp, torch.autograd.grad((lp * torch.linspace(-1, 1, lp.shape[0])).sum(), hidden)[0]

    ours = run(trl_head.FastpoChunkedLogProb)
    assert z.gathers == 1  # the forward's only
    theirs = run(trl_kernel.ChunkedLogProbFunction)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6)
