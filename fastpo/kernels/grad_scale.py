"""Triton kernel that scales a gradient in place by a scalar held on the device.

The fused losses write dL/dlogits during their forward; the backward must then multiply
it by the upstream gradient g (almost always exactly 1). Reading g on the host would
synchronise; multiplying unconditionally would add a read and a write of N x V. The buffer
holds ``grad * applied`` (``applied`` a one-element device tensor, 1 after the forward);
this kernel reads g and applied on the device and multiplies by ``g / applied``, and every
program returns at once when that is 1, so the common case costs one launch and no memory
traffic, nothing syncs (CUDA-graph safe), and a repeated backward stays correct. The
product is formed in fp32 (fp64 for fp64), then rounded once to the gradient's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["scale_grad_inplace"]


@triton.jit
def _scale_grad_kernel(
    grad_ptr,  # [R, C, V] fp32/bf16/fp16/fp64, unit stride along V
    scale_ptr,  # [1] fp32 (fp64 for fp64 gradients): the upstream gradient g
    applied_ptr,  # [1] same dtype: the factor the buffer already carries
    C, V,
    stride_r, stride_c,
    BLOCK_V: tl.constexpr,
):
    scale = tl.load(scale_ptr) / tl.load(applied_ptr)
    if scale == 1.0:
        return
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    ptr = grad_ptr + (row // C) * stride_r + (row % C) * stride_c + cols
    keep = cols < V
    g = tl.load(ptr, mask=keep, other=0.0)
    tl.store(ptr, (g.to(scale.dtype) * scale).to(grad_ptr.dtype.element_ty), mask=keep)


def scale_grad_inplace(grad: torch.Tensor, scale: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
    """``grad *= scale / applied`` in place (the caller then sets ``applied = scale``); ``grad``
    ``[N, V]`` or ``[R, C, V]`` with unit stride along V; ``scale``, ``applied`` one-element
    tensors on the same device, ``applied`` in the accumulation dtype."""
    g3 = grad if grad.dim() == 3 else grad.view(1, *grad.shape) if grad.dim() == 2 else grad.reshape(1, 1, -1)
    r, c, v = g3.shape
    if r * c * v == 0:
        return grad
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    s = scale.detach().reshape(1).to(acc)
    block = min(triton.next_power_of_2(v), 4096)
    _scale_grad_kernel[(r * c, triton.cdiv(v, block))](
        g3, s, applied, c, v, g3.stride(0), g3.stride(1), BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return grad
