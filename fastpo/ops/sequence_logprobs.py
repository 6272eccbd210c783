"""sequence_logprobs: backend registration, torch.library custom ops, autograd Function.

Every backend provides the same two launchers:

    fwd(logits [B, T, V], labels [B, T], temperature, ignore_index, average) -> (out [B], lse [B, T])
    bwd(logits, labels, lse, grad_out [B], temperature, ignore_index, average, grad_in) -> grad_in

``cpu`` / ``cuda`` run the dedicated compiled kernels (csrc/). ``triton`` and
``torch`` compose the ``token_logprobs`` launchers of the same backend with the
tiny per-sequence reduction of ``fastpo.reference.sequence_logprobs``: the
per-token forward reads the logits once and keeps only ``lse``; the backward
turns ``grad_out [B]`` into per-token upstream gradients and runs the per-token
backward, which reads the logits once and writes the gradient once (into the
logits buffer itself for the in-place variant). Logits may have any B and T
strides (e.g. ``logits[:, :-1]``): nothing N x V is copied.

Inputs reaching this layer are validated: logits [B, T, V] with unit stride
along V, labels [B, T] int64 contiguous.
"""
from __future__ import annotations

import functools

import torch

from .._validation import check_label_range
from ..reference.sequence_logprobs import sequence_grad_logp, sequence_sum
from ..reference._dtypes import acc_dtype
from . import registry

OP = "sequence_logprobs"
TOKEN_OP = "token_logprobs"

registry.register(
    OP, "torch",
    fwd="fastpo.ops.sequence_logprobs:torch_sequence_logprobs_fwd",
    bwd="fastpo.ops.sequence_logprobs:torch_sequence_logprobs_bwd",
)
registry.register(
    OP, "triton",
    fwd="fastpo.ops.sequence_logprobs:triton_sequence_logprobs_fwd",
    bwd="fastpo.ops.sequence_logprobs:triton_sequence_logprobs_bwd",
)
registry.register(
    OP, "cpu",
    fwd="fastpo.kernels.cpp:sequence_logprobs_fwd",
    bwd="fastpo.kernels.cpp:sequence_logprobs_bwd",
)
registry.register(
    OP, "cuda",
    fwd="fastpo.kernels.cpp:sequence_logprobs_fwd",
    bwd="fastpo.kernels.cpp:sequence_logprobs_bwd",
)


def _token_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` as the per-token launchers read it: ``[B*T, V]`` when the strides allow,
    else the ``[B, T, V]`` view itself (e.g. ``logits[:, :-1]``); never a copy."""
    b, t, v = logits.shape
    try:
        return logits.view(b * t, v)
    except RuntimeError:
        return logits


def _composed_fwd(backend, logits, labels, temperature, ignore_index, average):
    fwd = registry.launcher(TOKEN_OP, backend, "fwd")
    logp, _, lse = fwd(_token_rows(logits), labels.reshape(-1), temperature, ignore_index)
    logp, lse = logp.view(labels.shape), lse.view(labels.shape)
    return sequence_sum(logp, labels, ignore_index, average), lse


def _composed_bwd(backend, logits, labels, lse, grad_out, temperature, ignore_index, average, grad_in):
    bwd = registry.launcher(TOKEN_OP, backend, "bwd")
    grad_logp = sequence_grad_logp(grad_out.to(lse.dtype), labels, ignore_index, average)
    rows = _token_rows(logits)
    grad_rows = grad_in.view(rows.shape) if rows.dim() == 2 else grad_in
    lse_flat = lse.reshape(-1)
    # entropy is not differentiated here (grad_entropy=None): lse stands in for the unused argument
    bwd(rows, labels.reshape(-1), lse_flat, lse_flat, grad_logp.reshape(-1), None,
        temperature, ignore_index, grad_rows)
    return grad_in


torch_sequence_logprobs_fwd = functools.partial(_composed_fwd, "torch")
torch_sequence_logprobs_bwd = functools.partial(_composed_bwd, "torch")
triton_sequence_logprobs_fwd = functools.partial(_composed_fwd, "triton")
triton_sequence_logprobs_bwd = functools.partial(_composed_bwd, "triton")


@torch.library.custom_op("fastpo::sequence_logprobs_fwd", mutates_args=())
def sequence_logprobs_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, average: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B], lse [B, T]), fp32 (fp64 for fp64 logits)."""
    check_label_range(labels, logits.shape[-1], ignore_index)
    fwd = registry.launcher(OP, backend, "fwd")
    out, lse = fwd(logits, labels, temperature, ignore_index, average)
    return out, lse


@sequence_logprobs_fwd_op.register_fake
def _(logits, labels, temperature, ignore_index, average, backend):
    b, t, _ = logits.shape
    return logits.new_empty(b, dtype=acc_dtype(logits.dtype)), logits.new_empty(b, t, dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("fastpo::sequence_logprobs_bwd", mutates_args=())
def sequence_logprobs_bwd_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
    temperature: float, ignore_index: int, average: bool, backend: str,
) -> torch.Tensor:
    """dL/dlogits [B, T, V] in the logits' dtype, in a new contiguous buffer."""
    bwd = registry.launcher(OP, backend, "bwd")
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return bwd(logits, labels, lse, grad_out, temperature, ignore_index, average, grad)


@sequence_logprobs_bwd_op.register_fake
def _(logits, labels, lse, grad_out, temperature, ignore_index, average, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastpo::sequence_logprobs_bwd_inplace", mutates_args=("logits",))
def sequence_logprobs_bwd_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
    temperature: float, ignore_index: int, average: bool, backend: str,
) -> None:
    """Overwrite ``logits`` with dL/dlogits: no second B x T x V allocation."""
    bwd = registry.launcher(OP, backend, "bwd")
    bwd(logits, labels, lse, grad_out, temperature, ignore_index, average, logits)


@sequence_logprobs_bwd_inplace_op.register_fake
def _(logits, labels, lse, grad_out, temperature, ignore_index, average, backend):
    return None


class SequenceLogprobsFunction(torch.autograd.Function):
    """Autograd over the custom ops: ``out [B]`` differentiable w.r.t. ``logits [B, T, V]``."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, average, backend, inplace_backward):
        out, lse = sequence_logprobs_fwd_op(logits, labels, temperature, ignore_index, average, backend)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (temperature, ignore_index, average, backend, inplace_backward)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        temperature, ignore_index, average, backend, inplace = ctx.args
        args = (logits, labels, lse, grad_out.to(lse.dtype).contiguous(), temperature, ignore_index, average, backend)
        if inplace:
            sequence_logprobs_bwd_inplace_op(*args)
            grad = logits
        else:
            grad = sequence_logprobs_bwd_op(*args)
        return grad, None, None, None, None, None, None
