"""Scaling a precomputed gradient by the upstream gradient, without a host synchronisation.

The fused losses compute dL/dlogits in their forward; their backward multiplies it by the
upstream gradient g in place. ``GradBuffer`` holds that buffer plus ``applied``, the factor
it already carries (1 after the forward), so a repeated backward (``retain_graph=True``,
gradcheck) stays correct: each call multiplies by ``g / applied``. The multiplication is the
custom op ``fastpo::rescale_grad_`` (opaque to torch.compile, mutating both):

* CPU tensors read g directly (no device to wait for) and skip the pass when the factor is 1;
* CUDA tensors use the Triton kernel of ``fastpo.kernels.grad_scale``, which reads the factor
  on the device and does nothing when it is 1; without triton, ``torch.mul(..., out=)``.

The product is formed at fp32 (fp64) precision: rounding g to bf16 first (1/3 -> 0.33398)
would bias the gradient by 0.2 %. An upstream gradient of exactly 0 followed by another
backward cannot be undone (the buffer is 0): that second call gives NaN (CUDA) or raises (CPU).
"""
from __future__ import annotations

import importlib.util

import torch

__all__ = ["GradBuffer"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastpo::rescale_grad_", mutates_args=("grad", "applied"))
def rescale_grad_op(grad: torch.Tensor, scale: torch.Tensor, applied: torch.Tensor) -> None:
    acc = _acc(grad.dtype)
    if grad.device.type == "cpu":
        done = float(applied)
        if done == 0.0:
            raise RuntimeError("fastpo: a previous backward scaled this gradient by 0; it cannot be rescaled")
        factor = float(scale) / done
        if factor != 1.0:
            # a 0-dim fp32 operand keeps its fp32 value in torch's CPU kernel for bf16/fp16
            grad.mul_(torch.tensor(factor, dtype=acc))
    elif importlib.util.find_spec("triton") is not None:
        from ..kernels.grad_scale import scale_grad_inplace

        scale_grad_inplace(grad, scale, applied)
    else:
        # a one-element (not 0-dim) fp32 operand makes the computation fp32; out= rounds once
        torch.mul(grad, (scale.detach().reshape(1).to(acc) / applied), out=grad)
    applied.copy_(scale.detach().reshape(1))


@rescale_grad_op.register_fake
def _(grad, scale, applied):
    return None


class GradBuffer:
    """A gradient computed in the forward, returned by the backward scaled by its upstream
    gradient. Kept as a ctx attribute (not ``save_for_backward``): scaling it in place is the
    point, and must not trip autograd's version check of saved tensors."""

    def __init__(self, grad: torch.Tensor):
        self.grad = grad
        self.applied = torch.ones(1, dtype=_acc(grad.dtype), device=grad.device)

    def scaled(self, upstream: torch.Tensor) -> torch.Tensor:
        rescale_grad_op(self.grad, upstream, self.applied)
        return self.grad
