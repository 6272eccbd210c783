"""Triton kernels for the log-softmax gather with entropy (`token_logprobs`).

Forward: one program per row, one pass over the vocabulary in BLOCK_V blocks,
per-lane online softmax states merged with ``lse_merge``; writes logp, entropy
and the row's logsumexp (saved for the backward). Ignored rows read nothing.

Backward: one program per row, one read of the logits and one write of the
gradient (which may be the logits buffer itself: each block is read before it
is overwritten by the same program):

    dL/dz_j = (1/tau) * [ g_lp * (1[j = y] - p_j) - g_H * p_j * (log p_j + H) ]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference._dtypes import acc_dtype
from ._online import row_softmax_stats, store_softmax_grad, store_zero_row, to_acc

__all__ = ["token_logprobs_fwd", "token_logprobs_bwd", "pick_block_v"]


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr,  # [N, V] fp32/bf16/fp16/fp64, unit stride along V
    labels_ptr,  # [N] int64
    logp_ptr,  # [N] fp32 (fp64 for fp64 logits)
    entropy_ptr,  # [N] same dtype as logp
    lse_ptr,  # [N] same dtype as logp
    # sizes and strides
    V,
    stride_row,
    # runtime hyper-parameters (never constexpr: no recompiles)
    temperature,
    ignore_index,
    # structural
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_row
    inv_t = 1.0 / temperature
    lse, entropy = row_softmax_stats(row_ptr, V, inv_t, BLOCK_V)
    # labels are validated on the host; the mask keeps a bad one from reading out of bounds
    in_vocab = (label >= 0) & (label < V)
    x_label = to_acc(tl.load(row_ptr + label, mask=in_vocab, other=0.0)) * inv_t
    tl.store(logp_ptr + row, x_label - lse)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr,  # [N, V] fp32/bf16/fp16/fp64, unit stride along V
    labels_ptr,  # [N] int64
    lse_ptr,  # [N] from the forward
    entropy_ptr,  # [N] from the forward
    grad_logp_ptr,  # [N] upstream gradient of logp
    grad_entropy_ptr,  # [N] upstream gradient of entropy (unused unless HAS_GRAD_ENTROPY)
    grad_ptr,  # [N, V] logits dtype; may alias logits_ptr (in-place backward)
    # sizes and strides
    V,
    stride_row,
    stride_grad_row,
    # runtime hyper-parameters
    temperature,
    ignore_index,
    # structural
    BLOCK_V: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    grad_row_ptr = grad_ptr + row * stride_grad_row
    if label == ignore_index:
        store_zero_row(grad_row_ptr, V, BLOCK_V)
        return
    g_h = 0.0
    h = 0.0
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        h = tl.load(entropy_ptr + row)
    store_softmax_grad(
        logits_ptr + row * stride_row, grad_row_ptr, label, tl.load(lse_ptr + row), h,
        tl.load(grad_logp_ptr + row), g_h, 1.0 / temperature, V, BLOCK_V, HAS_GRAD_ENTROPY,
    )


def pick_block_v(vocab: int) -> int:
    """One pinned block size per vocabulary size (never per batch: batch invariance)."""
    return min(triton.next_power_of_2(vocab), 4096)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def token_logprobs_fwd(
    logits: torch.Tensor,  # [N, V], stride(1) == 1
    labels: torch.Tensor,  # [N] int64, contiguous
    temperature: float,
    ignore_index: int,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns ``(logp, entropy, lse)``, each [N] fp32 (fp64 for fp64)."""
    n, v = logits.shape
    out_dtype = acc_dtype(logits.dtype)
    logp = torch.empty(n, dtype=out_dtype, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, entropy, lse
    block = block_v or pick_block_v(v)
    _token_logprobs_fwd_kernel[(n,)](
        logits, labels, logp, entropy, lse,
        v, logits.stride(0),
        float(temperature), int(ignore_index),
        BLOCK_V=block, num_warps=_num_warps(block),
    )
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: torch.Tensor,  # [N, V]
    labels: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N]
    entropy: torch.Tensor,  # [N]
    grad_logp: torch.Tensor,  # [N], same dtype as lse
    grad_entropy: torch.Tensor | None,  # [N] or None
    temperature: float,
    ignore_index: int,
    grad_out: torch.Tensor,  # [N, V] logits dtype; may be `logits`
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the backward, writing dL/dlogits into ``grad_out`` (returned)."""
    n, v = logits.shape
    if n == 0:
        return grad_out
    block = block_v or pick_block_v(v)
    has_ge = grad_entropy is not None
    _token_logprobs_bwd_kernel[(n,)](
        logits, labels, lse, entropy, grad_logp, grad_entropy if has_ge else grad_logp, grad_out,
        v, logits.stride(0), grad_out.stride(0),
        float(temperature), int(ignore_index),
        BLOCK_V=block, HAS_GRAD_ENTROPY=has_ge, num_warps=_num_warps(block),
    )
    return grad_out
