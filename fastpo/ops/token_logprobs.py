"""token_logprobs: backend registration, torch.library custom ops, autograd Function.

Read top-down: registry entries → out-variant custom ops (+ fake kernels so
torch.compile can trace) → ``TokenLogprobsFunction``. Inputs reaching this layer
are validated (types, shapes) and arranged as the kernels read them, without a
copy: logits ``[N, V]`` or ``[R, C, V]`` (unit stride along V; row r = i * C + j)
and labels ``[N]`` int64. The label range is checked inside the forward op
(``check_label_range``): eagerly even under torch.compile, before any kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validation import check_label_range
from ..reference._dtypes import acc_dtype
from . import registry

OP = "token_logprobs"

registry.register(
    OP, "torch",
    fwd="fastpo.reference.token_logprobs:token_logprobs_chunked_fwd",
    bwd="fastpo.reference.token_logprobs:token_logprobs_chunked_bwd",
)
registry.register(
    OP, "triton",
    fwd="fastpo.kernels.token_logprobs:token_logprobs_fwd",
    bwd="fastpo.kernels.token_logprobs:token_logprobs_bwd",
)
registry.register(
    OP, "cpu",
    fwd="fastpo.kernels.cpp:token_logprobs_fwd",
    bwd="fastpo.kernels.cpp:token_logprobs_bwd",
)
registry.register(
    OP, "cuda",
    fwd="fastpo.kernels.cpp:token_logprobs_fwd",
    bwd="fastpo.kernels.cpp:token_logprobs_bwd",
)


@torch.library.custom_op("fastpo::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse), each [N] fp32 (fp64 for fp64 logits)."""
    check_label_range(labels, logits.shape[-1], ignore_index)
    fwd = registry.launcher(OP, backend, "fwd")
    return tuple(fwd(logits, labels, temperature, ignore_index))


@token_logprobs_fwd_op.register_fake
def _(logits, labels, temperature, ignore_index, backend):
    n = labels.shape[0]
    out = logits.new_empty(n, dtype=acc_dtype(logits.dtype))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("fastpo::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor],
    temperature: float, ignore_index: int, backend: str,
) -> torch.Tensor:
    """dL/dlogits (the logits' shape, contiguous) in the logits' dtype, in a new buffer."""
    bwd = registry.launcher(OP, backend, "bwd")
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, grad)


@token_logprobs_bwd_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastpo::token_logprobs_bwd_inplace", mutates_args=("logits",))
def token_logprobs_bwd_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor],
    temperature: float, ignore_index: int, backend: str,
) -> None:
    """Overwrite ``logits`` with dL/dlogits: no second N x V allocation."""
    bwd = registry.launcher(OP, backend, "bwd")
    bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, logits)


@token_logprobs_bwd_inplace_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return None


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd over the custom ops: returns (logp, entropy), both differentiable."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, backend, inplace_backward):
        logp, entropy, lse = token_logprobs_fwd_op(logits, labels, temperature, ignore_index, backend)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, backend, inplace_backward)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend, inplace = ctx.args
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.to(lse.dtype).contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        args = (logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend)
        if inplace:
            token_logprobs_bwd_inplace_op(*args)
            grad = logits
        else:
            grad = token_logprobs_bwd_op(*args)
        return grad, None, None, None, None, None
