"""Triton kernels for the log-softmax gather with entropy (`token_logprobs`).

Forward: one program per row, one pass over the vocabulary in BLOCK_V blocks with the
online softmax of ``_online.py``; writes logp, entropy and the row's logsumexp (saved for
the backward). Ignored rows read nothing; a label outside [0, V) reads nothing either
(its read is masked) and gives NaN outputs.

Backward: one program per row, one read of the logits and one write of the gradient
(which may be the logits buffer itself: each element is read, then overwritten, by the
same thread):

    dL/dz_j = (1/tau) * [ g_lp * (1[j = y] - p_j) - g_H * p_j * (log p_j + H) ]

Rows: logits are [N, V] or [R, C, V] with any strides on the leading dims (a causal-LM
shift ``logits[:, :-1]`` is read in place, no copy) and unit stride along V; row
r = i*C + j sits at element offset i*stride_r + j*stride_c (int64).

Numerics: ``1/tau`` and ``log2(e)/tau`` are computed on the host in float64 and passed as
fp64 arguments (rounded once to fp32 in fp32 kernels); no FP contraction is left to the
compiler (``enable_fp_fusion=False``, FMAs are explicit ``tl.fma``), so the rounding does not
depend on the Triton version's default.

Alignment, vector loads and batch invariance: Triton specialises a launch on whether the
base pointer, each stride and V are divisible by 16 (and on ints equal to 1); nothing finer.
When the base is 16-byte aligned and V and the strides are multiples of 16, every row starts
aligned and full blocks are read with 128-bit loads (8 bf16/fp16, 4 fp32, 2 fp64 per load).
Otherwise (V = 50257 or 32001, a misaligned view, and also V = 32008: 8 | V is not tracked)
the same kernel is compiled with scalar loads: the same arithmetic, one load instruction
per element instead of per 8 (bf16); on sm_90 the pass-1 loop goes from 11.7 to 12.9 SASS
instructions per element (bf16; fp32 10.4 to 11.9), still under the 16 that streams HBM
(``fastpo aot``: ``load_bits`` 16/32). No head/tail realignment is done, on purpose: it
would make the column-to-lane assignment depend on a row's address, hence on its position
in the batch. As written, a row's result is a function of its values, V, dtype, temperature
and the compiled specialisation only: bitwise identical whatever the batch size, the other
rows and the row's position, for every launch that shares the specialisation (same
16-divisibility of base/strides/V; all rows of one odd-V tensor and a lone copy of such a
row do). Two views of one row that differ in that alignment class (a row of an aligned
[N, 32000] tensor vs the same values in a buffer with row stride 32001) run differently
vectorised binaries whose final lane reduction (``tl.sum``) may group lanes differently:
equal to a few fp32 ulps, not guaranteed bitwise.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference._dtypes import acc_dtype
from ._online import LN2, LOG2E, acc_scalar, row_offset, row_softmax_stats, store_const_row, store_softmax_grad

__all__ = ["token_logprobs_fwd", "token_logprobs_bwd", "pick_block_v"]


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr,  # [R, C, V] fp32/bf16/fp16/fp64, unit stride along V
    labels_ptr,  # [N] int64, N = R*C
    logp_ptr,  # [N] fp32 (fp64 for fp64 logits)
    entropy_ptr,  # [N] same dtype as logp
    lse_ptr,  # [N] same dtype as logp
    # sizes and strides (elements)
    V,
    C,
    stride_r,
    stride_c,
    # runtime hyper-parameters (never constexpr: no recompiles)
    k: tl.float64,  # log2(e) / temperature, from the host
    ignore_index,
    # structural
    BLOCK_V: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    in_vocab = (label >= 0) & (label < V)
    if (label == ignore_index) | (label < 0) | (label >= V):
        fill = tl.where(label == ignore_index, 0.0, float("nan"))
        tl.store(logp_ptr + row, fill)
        tl.store(entropy_ptr + row, fill)
        tl.store(lse_ptr + row, fill)
        return
    row_ptr = logits_ptr + row_offset(row, C, stride_r, stride_c)
    kk = acc_scalar(k, ACC)
    # the label's logit first, before any pass over the row (same order as the fused policy
    # kernel, which overwrites the row); masked: never an out-of-bounds read
    x_label = tl.load(row_ptr + label, mask=in_vocab, other=float("nan")).to(ACC)
    lse2, entropy = row_softmax_stats(row_ptr, V, kk, BLOCK_V)
    tl.store(logp_ptr + row, tl.fma(x_label, kk, -lse2) * LN2)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse2 * LN2)


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr,  # [R, C, V] fp32/bf16/fp16/fp64, unit stride along V
    labels_ptr,  # [N] int64
    lse_ptr,  # [N] from the forward (natural log)
    entropy_ptr,  # [N] from the forward
    grad_logp_ptr,  # [N] upstream gradient of logp
    grad_entropy_ptr,  # [N] upstream gradient of entropy (unused unless HAS_GRAD_ENTROPY)
    grad_ptr,  # [R, C, V] logits dtype; may alias logits_ptr (in-place backward)
    # sizes and strides (elements)
    V,
    C,
    stride_r,
    stride_c,
    stride_grad_r,
    stride_grad_c,
    # runtime hyper-parameters
    inv_t: tl.float64,  # 1 / temperature, from the host
    k: tl.float64,  # log2(e) / temperature
    ignore_index,
    # structural
    BLOCK_V: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    grad_row_ptr = grad_ptr + row_offset(row, C, stride_grad_r, stride_grad_c)
    if label == ignore_index:
        store_const_row(grad_row_ptr, V, 0.0, BLOCK_V)
        return
    if (label < 0) | (label >= V):
        store_const_row(grad_row_ptr, V, float("nan"), BLOCK_V)
        return
    g_h = 0.0
    h = 0.0
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        h = tl.load(entropy_ptr + row)
    kk = acc_scalar(k, ACC)
    lse2 = tl.load(lse_ptr + row).to(ACC) * LOG2E
    store_softmax_grad(
        logits_ptr + row_offset(row, C, stride_r, stride_c), grad_row_ptr, label, kk, lse2, h,
        tl.load(grad_logp_ptr + row), g_h, acc_scalar(inv_t, ACC), V, BLOCK_V, HAS_GRAD_ENTROPY,
    )


def pick_block_v(vocab: int, dtype: torch.dtype | None = None) -> int:
    """One pinned block size per vocabulary size and dtype (never per batch: batch invariance).
    float64 (the gradcheck path: libdevice exp2, two registers per value) takes half the
    block so that two blocks of 8 warps fit an SM."""
    cap = 2048 if dtype == torch.float64 else 4096
    return min(triton.next_power_of_2(vocab), cap)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


# Pinned for every launch: FP contraction off (explicit tl.fma instead; Triton 3.9 warns that
# its default flips in 3.10), and at most 128 registers, i.e. two 8-warp blocks per SM
# (without the cap ptxas 3.6 picks 64 for the fp32 policy kernel and spills 8 bytes).
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "maxnreg": 128}


def temperature_scales(temperature: float) -> tuple[float, float]:
    """``(1/tau, log2(e)/tau)`` in float64 on the host."""
    inv_t = 1.0 / float(temperature)
    return inv_t, inv_t * math.log2(math.e)


def as_rows3(t: torch.Tensor) -> tuple[int, int, int, int]:
    """``(N, C, stride_r, stride_c)`` of [N, V] or [R, C, V] logits (unit stride along V)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError("logits must have unit stride along the vocabulary")
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"logits must be [N, V] or [R, C, V], got {tuple(t.shape)}")


def flat(t: torch.Tensor) -> torch.Tensor:
    """A per-row vector as a contiguous [N] (no copy when it already is one)."""
    return t.reshape(-1).contiguous()


def token_logprobs_fwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V], stride(-1) == 1, any leading strides
    labels: torch.Tensor,  # [N] int64
    temperature: float,
    ignore_index: int,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns ``(logp, entropy, lse)``, each [N] fp32 (fp64 for fp64)."""
    n, c, s_r, s_c = as_rows3(logits)
    v = logits.shape[-1]
    out_dtype = acc_dtype(logits.dtype)
    logp = torch.empty(n, dtype=out_dtype, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, entropy, lse
    block = block_v or pick_block_v(v, logits.dtype)
    _, k = temperature_scales(temperature)
    _token_logprobs_fwd_kernel[(n,)](
        logits, flat(labels), logp, entropy, lse,
        v, c, s_r, s_c,
        k, int(ignore_index),
        BLOCK_V=block, num_warps=_num_warps(block), **LAUNCH_OPTIONS,
    )
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V]
    labels: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N]
    entropy: torch.Tensor,  # [N]
    grad_logp: torch.Tensor,  # [N], same dtype as lse
    grad_entropy: torch.Tensor | None,  # [N] or None
    temperature: float,
    ignore_index: int,
    grad_out: torch.Tensor,  # same shape as logits, stride(-1) == 1; may be `logits`
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the backward, writing dL/dlogits into ``grad_out`` (returned)."""
    n, c, s_r, s_c = as_rows3(logits)
    if grad_out.shape != logits.shape:
        raise ValueError("grad_out must have the shape of logits")
    _, _, g_r, g_c = as_rows3(grad_out)
    v = logits.shape[-1]
    if n == 0:
        return grad_out
    block = block_v or pick_block_v(v, logits.dtype)
    has_ge = grad_entropy is not None
    grad_logp = flat(grad_logp)
    inv_t, k = temperature_scales(temperature)
    _token_logprobs_bwd_kernel[(n,)](
        logits, flat(labels), flat(lse), flat(entropy), grad_logp,
        flat(grad_entropy) if has_ge else grad_logp, grad_out,
        v, c, s_r, s_c, g_r, g_c,
        inv_t, k, int(ignore_index),
        BLOCK_V=block, HAS_GRAD_ENTROPY=has_ge, num_warps=_num_warps(block), **LAUNCH_OPTIONS,
    )
    return grad_out
