"""Reference PPO-family policy loss on per-token log-probs, and the one aggregation formula.

Shapes: logprobs, old_logprobs, mask, ref_logprobs, entropy ``[B, T]``; advantages ``[B]``
(one per sequence) or ``[B, T]``. mask: nonzero = count the token. Computed in float64 for
float64 ``logprobs``, else float32; the loss and per-token loss come back in that dtype.

Per token, with r = exp(logp - old) (after the optional log-ratio clamp), A the advantage,
lo = 1 - clip_low, hi = 1 + clip_high:

    ppo    L = max(-A * min(r, ratio_cap), -A * clip(r, lo, hi))
               (PPO, Schulman et al. 2017 "Proximal Policy Optimization Algorithms";
                GRPO, Shao et al. 2024 "DeepSeekMath"; clip-higher from DAPO, Yu et al. 2025;
                ratio_cap is TRL's delta from INTELLECT-2, 2025)
           dual-clip (Ye et al. 2020), where A < 0:  L = min(L, -c * A)
    gspo   the same with r replaced, per token, by s_it = sg[s_i] * exp(logp - sg[logp]),
           log s_i = sum_t m (logp - old) / max(1, sum_t m)   (GSPO, Zheng et al. 2025,
           "Group Sequence Policy Optimization", token form of eq. 10)
    cispo  L = -sg[clip(r, lo, hi)] * A * logp   (CISPO, MiniMax-M1, 2025)

then L += kl_coef * KL(logp, ref) (``kl_penalty_ref``; k3 from Schulman's blog "Approximating
KL divergence", 2020) and L -= entropy_coef * H. Masked positions: L = 0 exactly and zero
gradient; their inputs are replaced by 0 before any arithmetic, so inf/NaN there cannot leak.

Aggregation (``aggregate_ref``), m the mask, S = num_sequences (default B), N = num_tokens
(default max(1, sum m)):

    token-mean               sum m L / N
    seq-mean-token-mean      (1/S) sum_i (sum_t m L / max(1, sum_t m))
    seq-mean-token-sum       (1/S) sum_i sum_t m L
    seq-mean-token-sum-norm  sum m L / (S * agg_scale), agg_scale default T  (Dr. GRPO, Liu et al. 2025)

A sequence whose mask is all 0 contributes 0 to the loss and still counts in S; an all-masked
batch gives loss 0 with zero gradients. num_tokens / num_sequences are the global counts under
gradient accumulation or data parallel (then sum the per-micro-batch losses, or average them
across ranks with the counts divided by the world size).
"""
from __future__ import annotations

import torch

from ._dtypes import acc_dtype, keep_mask

from .kl_penalty import kl_penalty_ref

__all__ = ["aggregate_ref", "masked_token_mean_ref", "policy_loss_ref"]


def _count(value, like: torch.Tensor):
    """A normaliser given as a number or a one-element tensor (made 0-dim), in the accumulation dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(())
    return float(value)


def aggregate_ref(
    per_token_loss: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] bool or 0/1
    agg: str,
    *,
    num_tokens=None,
    num_sequences=None,
    agg_scale=None,
) -> torch.Tensor:
    """The aggregation formula of every fastpo policy/value loss (module docstring)."""
    keep = keep_mask(mask)
    loss = torch.where(keep, per_token_loss, torch.zeros((), dtype=per_token_loss.dtype, device=keep.device))
    batch, length = loss.shape
    seqs = max(batch, 1) if num_sequences is None else _count(num_sequences, loss)
    if agg == "token-mean":
        tokens = keep.sum().clamp(min=1).to(loss.dtype) if num_tokens is None else _count(num_tokens, loss)
        return loss.sum() / tokens
    if agg == "seq-mean-token-mean":
        per_seq = loss.sum(-1) / keep.sum(-1).clamp(min=1).to(loss.dtype)
        return per_seq.sum() / seqs
    if agg == "seq-mean-token-sum":
        return loss.sum(-1).sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        scale = float(length) if agg_scale is None else float(agg_scale)
        return loss.sum(-1).sum() / (seqs * scale)
    raise ValueError(f"unknown agg {agg!r}")


def masked_token_mean_ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum m x / max(1, sum m) over the whole batch, in x's dtype."""
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(keep, x, zero).sum() / keep.sum().clamp(min=1).to(x.dtype)


def policy_loss_ref(
    logprobs: torch.Tensor,  # [B, T] log pi_theta(y_t)
    old_logprobs: torch.Tensor,  # [B, T] log pi_old(y_t) (behaviour policy)
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] bool or 0/1
    *,
    ref_logprobs: torch.Tensor | None = None,  # [B, T] log pi_ref(y_t)
    entropy: torch.Tensor | None = None,  # [B, T] per-token entropy H_t
    config,
    num_tokens=None,
    num_sequences=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Oracle: ``(loss, per_token_loss, metrics)``; ``config`` is read by attribute only.

    metrics: detached 0-dim float32 masked token means, keys "clip_frac_low",
    "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "ref_kl", "entropy"
    (definitions in ``fastpo.config.PolicyLossOutput``).
    """
    variant = config.variant
    if variant not in ("ppo", "gspo", "cispo"):
        raise ValueError(f"unknown variant {variant!r}")
    acc = acc_dtype(logprobs.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=logprobs.device)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x.to(acc), zero)

    logp = masked(logprobs)
    old = masked(old_logprobs)
    adv = advantages.to(acc)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(logp)
    adv = torch.where(keep, adv, zero)

    log_ratio = logp - old
    if config.logratio_clamp is not None:
        c = float(config.logratio_clamp)
        log_ratio = log_ratio.clamp(min=-c, max=c)
    if variant == "gspo":
        seq_log_ratio = log_ratio.sum(-1) / keep.sum(-1).clamp(min=1).to(acc)
        ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + (logp - logp.detach()))
    else:
        ratio = torch.exp(log_ratio)

    lo, hi = 1.0 - float(config.clip_low), 1.0 + float(config.clip_high)
    clipped = ratio.clamp(min=lo, max=hi)
    no_dual = torch.zeros_like(keep)
    if variant == "cispo":
        pg = -clipped.detach() * adv * logp
        low_active, high_active, dual_active = ratio < lo, ratio > hi, no_dual
    else:
        unclipped = ratio if config.ratio_cap is None else ratio.clamp(max=float(config.ratio_cap))
        pg = torch.maximum(-adv * unclipped, -adv * clipped)
        low_active = (adv < 0) & (unclipped < lo)
        high_active = (adv > 0) & (unclipped > hi)
        dual_active = no_dual
        if config.dual_clip is not None:
            bound = -adv * float(config.dual_clip)
            dual_active = (adv < 0) & (pg > bound)
            pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)

    per_token = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty_ref(logp, masked(ref_logprobs), config.kl_estimator, config.kl_clamp)
        if float(config.kl_coef) != 0.0:
            per_token = per_token + float(config.kl_coef) * kl
    ent = None if entropy is None else masked(entropy)
    if ent is not None and float(config.entropy_coef) != 0.0:
        per_token = per_token - float(config.entropy_coef) * ent
    per_token = torch.where(keep, per_token, zero)

    loss = aggregate_ref(
        per_token,
        keep,
        config.agg,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        agg_scale=config.agg_scale,
    )

    with torch.no_grad():

        def mean(x: torch.Tensor | None) -> torch.Tensor:
            if x is None:
                return torch.zeros((), dtype=torch.float32, device=logprobs.device)
            return masked_token_mean_ref(x.detach().to(acc), keep).float()

        metrics = {
            "clip_frac_low": mean(low_active),
            "clip_frac_high": mean(high_active),
            "dual_clip_frac": mean(dual_active),
            "ratio_mean": mean(ratio),
            "approx_kl": mean(torch.expm1(log_ratio) - log_ratio),
            "ref_kl": mean(kl),
            "entropy": mean(ent),
        }
    return loss, per_token, metrics
