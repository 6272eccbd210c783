"""Triton kernel of the fused token-local policy loss (variants "ppo", "cispo", "sapo", "pg").

One program per token row. The label's logit is read first; pass 1
(``row_softmax_stats``) gives the logsumexp and entropy, hence logp. Then, per token, the ratio
r (after the optional log-ratio clamp), the surrogate S of the variant (ppo: asymmetric clip,
TRL's ratio cap, dual clip; cispo: -sg[clip(r)] A logp; sapo: -A (4/tau) sigmoid(tau (r - 1));
pg: -A logp), the KL penalty K (times r when KL_WEIGHTED) and the entropy bonus — values and
their derivatives d / d logp:

    per_token_loss = pw S + kl_coef K - entropy_coef H
    dL/dlogp = w pw S' + klw kl_coef K',   dL/dH = -entw entropy_coef

with pw = policy_w (1 when absent), klw = kl_w and entw = ent_w (w, the aggregation weight,
when absent). Because these weights are known before the kernel runs, pass 2
(``store_softmax_grad``) writes dL/dlogits right away, into a buffer or over the
logits themselves; the backward only scales by the upstream scalar.

Derivatives follow PyTorch's autograd of the reference exactly, including its
conventions at ties (``maximum``/``minimum`` split the gradient evenly) and at
clamp boundaries (inclusive), so the fused gradient equals the composed one.

In place (``grad_out`` is the logits): pass 2 overwrites the row, so everything the kernel
needs from the row is read before it: the label's logit before pass 1, whose reductions end
with the block's last barrier before the first gradient store (``fastpo aot`` checks that no
load of the logits but pass 2's own read-then-write sits after that barrier). Rows, strides,
temperature, alignment and batch invariance: as ``fastpo.kernels.token_logprobs``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference._dtypes import acc_dtype
from ._online import LN2, acc_scalar, row_offset, row_softmax_stats, store_const_row, store_softmax_grad
from .policy_args import INF, KL_KINDS, VARIANT_CODES, PolicyKernelArgs
from .token_logprobs import LAUNCH_OPTIONS, _num_warps, as_rows3, flat, pick_block_v, temperature_scales

__all__ = ["PolicyKernelArgs", "policy_loss_fwd", "KL_KINDS", "VARIANT_CODES"]


@triton.jit
def _clamp_with_grad(x, dx, lo, hi):
    """torch.clamp(x, lo, hi) and its gradient (passes where lo <= x <= hi)."""
    inside = (x >= lo) & (x <= hi)
    return tl.minimum(tl.maximum(x, lo), hi), tl.where(inside, dx, 0.0)


@triton.jit
def _ratio(logp, old, logratio_clamp):
    """r = exp(clamp(logp - old, -c, c)) and dr/dlogp (scalars)."""
    log_ratio, d_lr = _clamp_with_grad(logp - old, 1.0, -logratio_clamp, logratio_clamp)
    ratio = tl.exp(log_ratio)
    return ratio, ratio * d_lr


@triton.jit
def _surrogate(logp, ratio, d_ratio, adv, clip_low, clip_high, ratio_cap, dual_clip, tau_pos, tau_neg,
               VARIANT: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token policy-gradient loss S and dS/dlogp (scalars) of the variant."""
    if VARIANT == 4:  # pg: -A * logp
        loss = -adv * logp
        d_loss = -adv
    elif VARIANT == 3:  # sapo: -A * (4 / tau) * sigmoid(tau * (r - 1))
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        z = tau * (ratio - 1.0)
        e = tl.exp(-tl.abs(z))  # in (0, 1]: no overflow for any z
        inv = 1.0 / (1.0 + e)
        sig = tl.where(z >= 0, inv, e * inv)
        loss = -adv * (4.0 / tau) * sig
        d_loss = -adv * 4.0 * (e * inv * inv) * d_ratio  # sigmoid' = s (1 - s) = e / (1 + e)^2
    elif VARIANT == 2:  # cispo: -sg[clip(r)] * A * logp
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        loss = -clipped * adv * logp
        d_loss = -clipped * adv
    else:
        clipped, d_clipped = _clamp_with_grad(ratio, d_ratio, 1.0 - clip_low, 1.0 + clip_high)
        unclipped, d_unclipped = _clamp_with_grad(ratio, d_ratio, -float("inf"), ratio_cap)
        pg1 = -adv * unclipped
        pg2 = -adv * clipped
        loss = tl.maximum(pg1, pg2)
        g1 = -adv * d_unclipped
        g2 = -adv * d_clipped
        d_loss = tl.where(pg1 > pg2, g1, tl.where(pg1 < pg2, g2, 0.5 * (g1 + g2)))
        if HAS_DUAL:
            bound = -adv * dual_clip
            d_dual = tl.where(loss < bound, d_loss, tl.where(loss > bound, 0.0, 0.5 * d_loss))
            neg = adv < 0
            d_loss = tl.where(neg, d_dual, d_loss)
            loss = tl.where(neg, tl.minimum(loss, bound), loss)
    return loss, d_loss


@triton.jit
def _kl_term(d, kl_clamp, KL_KIND: tl.constexpr, KL_STRAIGHT: tl.constexpr):
    """KL estimate of d = logp - ref and its derivative in d (see reference/kl_penalty.py)."""
    if KL_KIND == 1:
        value = d
        d_value = d * 0.0 + 1.0
    elif KL_KIND == 2:
        value = 0.5 * d * d
        d_value = d
    elif KL_KIND == 3:
        neg, d_neg = _clamp_with_grad(-d, 1.0, -(kl_clamp + 1.0), tl.log(2.0 * kl_clamp + 2.0))
        e = tl.exp(neg)
        value = e - neg - 1.0
        d_value = -(e - 1.0) * d_neg
    else:
        value = tl.abs(d)
        d_value = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    value, d_value = _clamp_with_grad(value, d_value, -kl_clamp, kl_clamp)
    if KL_STRAIGHT:
        d_value = d
    return value, d_value


@triton.jit
def _policy_loss_fwd_kernel(
    # pointers
    logits_ptr,  # [R, C, V] fp32/bf16/fp16/fp64, unit stride along V
    labels_ptr,  # [N] int64 (N = R*C); masked tokens carry ignore_index
    old_ptr,  # [N] fp32 old log-probs
    adv_ptr,  # [N] fp32 advantages (per token)
    ref_ptr,  # [N] fp32 reference log-probs (read only when KL_KIND > 0)
    weight_ptr,  # [N] fp32 d loss / d per_token_loss (aggregation weight, 0 where masked)
    policy_w_ptr,  # [N] (HAS_POLICY_W) factor pw of the policy term, in the loss and its gradient
    kl_w_ptr,  # [N] (HAS_KL_W) gradient weight of the KL term (else weight)
    ent_w_ptr,  # [N] (HAS_ENT_W) gradient weight of the entropy term (else weight)
    loss_ptr,  # [N] out: per-token loss
    logp_ptr,  # [N] out: log-prob of the label
    entropy_ptr,  # [N] out: entropy
    grad_ptr,  # [R, C, V] out (WRITE_GRAD): dL/dlogits in logits dtype; may alias logits_ptr
    # sizes and strides (elements)
    V,
    C,
    stride_r,
    stride_c,
    stride_grad_r,
    stride_grad_c,
    # runtime hyper-parameters
    # (typed float64: an untyped Python float is an fp32 argument, which put 1 - clip_low,
    # kl_coef, ... ~1e-8 off in the float64 kernel; each is taken into ACC below)
    clip_low: tl.float64, clip_high: tl.float64, ratio_cap: tl.float64, dual_clip: tl.float64,
    logratio_clamp: tl.float64, kl_clamp: tl.float64, kl_coef: tl.float64, entropy_coef: tl.float64,
    sapo_tau_pos: tl.float64,  # sapo gate temperatures (float64 on the host, used in ACC)
    sapo_tau_neg: tl.float64,
    inv_t: tl.float64,  # 1 / temperature, from the host
    k: tl.float64,  # log2(e) / temperature
    ignore_index,
    # structural
    BLOCK_V: tl.constexpr,
    VARIANT: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    KL_STRAIGHT: tl.constexpr,
    KL_WEIGHTED: tl.constexpr,  # KL term times the ratio r (kl_importance_weighted)
    HAS_ENTROPY_TERM: tl.constexpr,
    HAS_POLICY_W: tl.constexpr,
    HAS_KL_W: tl.constexpr,
    HAS_ENT_W: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    clip_low, clip_high = acc_scalar(clip_low, ACC), acc_scalar(clip_high, ACC)
    ratio_cap, dual_clip = acc_scalar(ratio_cap, ACC), acc_scalar(dual_clip, ACC)
    logratio_clamp, kl_clamp = acc_scalar(logratio_clamp, ACC), acc_scalar(kl_clamp, ACC)
    kl_coef, entropy_coef = acc_scalar(kl_coef, ACC), acc_scalar(entropy_coef, ACC)
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    grad_row_ptr = grad_ptr + row_offset(row, C, stride_grad_r, stride_grad_c)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        if WRITE_GRAD:
            store_const_row(grad_row_ptr, V, 0.0, BLOCK_V)
        return
    in_vocab = (label >= 0) & (label < V)
    if (label < 0) | (label >= V):
        tl.store(loss_ptr + row, float("nan"))
        tl.store(logp_ptr + row, float("nan"))
        tl.store(entropy_ptr + row, float("nan"))
        if WRITE_GRAD:
            store_const_row(grad_row_ptr, V, float("nan"), BLOCK_V)
        return
    row_ptr = logits_ptr + row_offset(row, C, stride_r, stride_c)
    kk = acc_scalar(k, ACC)
    # Read the label's logit BEFORE pass 1: pass 2 may overwrite the row in place, and only
    # pass 1's reductions (barriers) order this read before another warp's first store.
    x_label = tl.load(row_ptr + label, mask=in_vocab, other=float("nan")).to(ACC)
    lse2, entropy = row_softmax_stats(row_ptr, V, kk, BLOCK_V)
    logp = tl.fma(x_label, kk, -lse2) * LN2

    # Everything per token below is read after pass 1 (scalars: nothing live across the loop).
    ratio, d_ratio = _ratio(logp, tl.load(old_ptr + row), logratio_clamp)
    loss, d_loss = _surrogate(
        logp, ratio, d_ratio, tl.load(adv_ptr + row), clip_low, clip_high, ratio_cap, dual_clip,
        acc_scalar(sapo_tau_pos, ACC), acc_scalar(sapo_tau_neg, ACC), VARIANT, HAS_DUAL,
    )
    if HAS_POLICY_W:
        pw = tl.load(policy_w_ptr + row)
        loss = pw * loss
        d_loss = pw * d_loss
    d_kl_term = 0.0  # kl_coef * K', when it carries its own weight (HAS_KL_W)
    if KL_KIND > 0:
        kl, d_kl = _kl_term(logp - tl.load(ref_ptr + row), kl_clamp, KL_KIND, KL_STRAIGHT)
        if KL_WEIGHTED:
            d_kl = tl.fma(d_kl, ratio, kl * d_ratio)
            kl = kl * ratio
        loss += kl_coef * kl
        if HAS_KL_W:
            d_kl_term = kl_coef * d_kl
        else:
            d_loss += kl_coef * d_kl
    if HAS_ENTROPY_TERM:
        loss -= entropy_coef * entropy
    tl.store(loss_ptr + row, loss)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    if WRITE_GRAD:
        w = tl.load(weight_ptr + row)
        g_lp = w * d_loss
        if KL_KIND > 0:
            if HAS_KL_W:
                g_lp = tl.fma(tl.load(kl_w_ptr + row), d_kl_term, g_lp)
        g_h = -w * entropy_coef
        if HAS_ENTROPY_TERM:
            if HAS_ENT_W:
                g_h = -tl.load(ent_w_ptr + row) * entropy_coef
        store_softmax_grad(
            row_ptr, grad_row_ptr, label, kk, lse2, entropy, g_lp, g_h,
            acc_scalar(inv_t, ACC), V, BLOCK_V, HAS_ENTROPY_TERM,
        )


def policy_loss_fwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V], stride(-1) == 1, any leading strides
    labels: torch.Tensor,  # [N] int64, masked tokens = ignore_index
    old_logprobs: torch.Tensor,  # [N] fp32/fp64
    advantages: torch.Tensor,  # [N]
    ref_logprobs: torch.Tensor | None,  # [N] or None
    weight: torch.Tensor,  # [N]
    args: PolicyKernelArgs,
    grad_out: torch.Tensor | None,  # shape of logits, logits dtype (may be `logits`), or None
    policy_w: torch.Tensor | None = None,  # [N] accumulation dtype; None: 1
    kl_w: torch.Tensor | None = None,  # [N] accumulation dtype; None: weight
    ent_w: torch.Tensor | None = None,  # [N] accumulation dtype; None: weight
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel; returns ``(per_token_loss, logp, entropy)`` ([N] each).

    ``policy_w`` multiplies the policy term in the loss and its gradient; ``kl_w`` / ``ent_w``
    replace ``weight`` as the gradient weight of the KL / entropy terms (per_token_loss is
    ``pw S + kl_coef K - entropy_coef H`` either way)."""
    n, c, s_r, s_c = as_rows3(logits)
    v = logits.shape[-1]
    acc = acc_dtype(logits.dtype)

    def opt_vec(t, name):
        if t is None:
            return None
        if t.dtype != acc or t.numel() != n:
            raise ValueError(f"{name} must have {n} elements of dtype {acc}, got {tuple(t.shape)} {t.dtype}")
        return flat(t)

    policy_w, kl_w, ent_w = opt_vec(policy_w, "policy_w"), opt_vec(kl_w, "kl_w"), opt_vec(ent_w, "ent_w")
    loss = torch.empty(n, dtype=acc, device=logits.device)
    logp, entropy = torch.empty_like(loss), torch.empty_like(loss)
    if n == 0:
        return loss, logp, entropy
    block = block_v or pick_block_v(v, logits.dtype)
    write_grad = grad_out is not None
    grad = grad_out if write_grad else logits  # never written when WRITE_GRAD is False
    if grad.shape != logits.shape:
        raise ValueError("grad_out must have the shape of logits")
    _, _, g_r, g_c = as_rows3(grad)
    old = flat(old_logprobs)
    inv_t, k = temperature_scales(args.temperature)
    w = flat(weight)
    _policy_loss_fwd_kernel[(n,)](
        logits, flat(labels), old, flat(advantages),
        flat(ref_logprobs) if ref_logprobs is not None else old, w,
        policy_w if policy_w is not None else w,  # dummies are never read
        kl_w if kl_w is not None else w, ent_w if ent_w is not None else w,
        loss, logp, entropy, grad,
        v, c, s_r, s_c, g_r, g_c,
        args.clip_low, args.clip_high, args.ratio_cap, args.dual_clip, args.logratio_clamp,
        args.kl_clamp, args.kl_coef, args.entropy_coef,
        float(args.sapo_tau_pos), float(args.sapo_tau_neg), inv_t, k, args.ignore_index,
        BLOCK_V=block, VARIANT=args.variant, HAS_DUAL=args.dual_clip != INF,
        KL_KIND=args.kl_kind, KL_STRAIGHT=args.kl_straight,
        KL_WEIGHTED=bool(args.kl_weighted and args.kl_kind != 0),
        HAS_ENTROPY_TERM=args.entropy_coef != 0.0,
        HAS_POLICY_W=policy_w is not None, HAS_KL_W=kl_w is not None and args.kl_kind != 0,
        HAS_ENT_W=ent_w is not None and args.entropy_coef != 0.0, WRITE_GRAD=write_grad,
        num_warps=_num_warps(block), **LAUNCH_OPTIONS,
    )
    return loss, logp, entropy
