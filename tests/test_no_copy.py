"""The causal-LM shift ``logits[:, :-1]`` is read in place on every backend (issue 8, defect 5).

The forward allocates nothing vocabulary-sized; the backward allocates the gradient of the
slice only (none in place: it is written over the logits). What autograd's own slice
backward then does (a zero-padded [B, T, V] gradient of the full logits) is outside fastpo.
The ``torch`` backend is the eager reference: it must give the same values on a view, but
its log-softmax chunks are allocations by design, so the peak-memory bounds are checked on
the kernel backends only.
"""
from __future__ import annotations

import pytest
import torch

import fastpo
from fastpo.benchmarks._measure import peak_extra_bytes
from tests.conftest import backend_params, make_labels, make_logits

B, T, V = 3, 9, 257


def _batch(dtype, device):
    full = make_logits((B, T, V), dtype, device)
    labels = make_labels((B, T - 1), V, device)
    return full, labels


@pytest.mark.parametrize("device,backend", backend_params("token_logprobs"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_reads_the_shift_slice_in_place(device, backend, dtype):
    full, labels = _batch(dtype, device)
    view = full[:, :-1]
    assert not view.is_contiguous()
    lp_view, h_view = fastpo.token_logprobs(view, labels, return_entropy=True, backend=backend)
    lp_copy, h_copy = fastpo.token_logprobs(view.contiguous(), labels, return_entropy=True, backend=backend)
    assert torch.equal(lp_view, lp_copy) and torch.equal(h_view, h_copy)
    if backend == "torch":
        return
    slice_bytes = view.numel() * view.element_size()
    fwd_peak = peak_extra_bytes(lambda: fastpo.token_logprobs(view, labels, backend=backend), torch.device(device))
    assert fwd_peak < slice_bytes / 4, f"forward allocated {fwd_peak} bytes (the slice is {slice_bytes})"


@pytest.mark.parametrize("device,backend", backend_params("token_logprobs"))
def test_token_logprobs_inplace_backward_on_the_shift_slice(device, backend):
    full, labels = _batch(torch.float32, device)
    expected_x = full[:, :-1].contiguous().requires_grad_()
    (expected,) = torch.autograd.grad(fastpo.token_logprobs(expected_x, labels, backend=backend).sum(), expected_x)
    leaf = full.clone().requires_grad_()
    buf = leaf.clone()  # stands for the lm_head output, whose memory the gradient may reuse
    view = buf[:, :-1]
    logp = fastpo.token_logprobs(view, labels, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad(logp.sum(), view)
    assert grad.data_ptr() == buf.data_ptr() and torch.equal(grad, expected)


@pytest.mark.parametrize("device,backend", backend_params("token_logprobs"))
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_policy_loss_reads_the_shift_slice_in_place(device, backend, inplace):
    full, labels = _batch(torch.float32, device)
    old = torch.full(labels.shape, -5.0, device=device)
    adv = torch.linspace(-1, 1, B, device=device)
    cfg = fastpo.PolicyLossConfig(entropy_coef=0.01)
    ref_x = full[:, :-1].contiguous().requires_grad_()
    ref_out = fastpo.policy_loss(ref_x, labels, old, adv, config=cfg, backend=backend)
    (expected,) = torch.autograd.grad(ref_out.loss, ref_x)
    leaf = full.clone().requires_grad_()
    buf = leaf.clone() if inplace else leaf  # the in-place path writes over a non-leaf buffer
    view = buf[:, :-1]
    slice_bytes = view.numel() * view.element_size()

    def run():
        return fastpo.policy_loss(view, labels, old, adv, config=cfg, inplace_backward=inplace, backend=backend)

    out = run()
    (grad_leaf,) = torch.autograd.grad(out.loss, leaf)
    assert torch.equal(out.loss, ref_out.loss)
    assert torch.equal(grad_leaf[:, :-1], expected) and not grad_leaf[:, -1].any()
    if inplace:
        # the forward wrote the gradient over the slice; the backward rescaled it there
        assert torch.equal(view.detach(), expected)
    elif backend != "torch":
        # the forward computes the gradient: exactly one slice-sized buffer, no copy of the logits
        peak = peak_extra_bytes(run, torch.device(device))
        assert peak < 1.25 * slice_bytes, f"peak {peak} bytes for a {slice_bytes}-byte slice"


@pytest.mark.parametrize("device,backend", backend_params("sequence_logprobs"))
def test_sequence_logprobs_reads_the_shift_slice_in_place(device, backend):
    full, labels = _batch(torch.float32, device)
    view = full[:, :-1]
    assert torch.equal(fastpo.sequence_logprobs(view, labels, backend=backend),
                       fastpo.sequence_logprobs(view.contiguous(), labels, backend=backend))
    if backend == "torch":
        return
    peak = peak_extra_bytes(lambda: fastpo.sequence_logprobs(view, labels, backend=backend), torch.device(device))
    assert peak < view.numel() * view.element_size() / 4

