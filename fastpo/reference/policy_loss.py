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
    sapo, pg, gmpo, vespo and gspo's seq_ratio / seq_ratio_grad / seq_logratio_max forms:
           ``fastpo/reference/policy_variants.py``

The policy term is then multiplied by the off-policy sequence mask (off_policy_mask_threshold),
the top-entropy mask (top_entropy_quantile) and the call's policy_weights (importance-sampling
correction), then L += kl_coef * KL(logp, ref) (``kl_penalty_ref``; k3 from Schulman's blog
"Approximating KL divergence", 2020; times the ratio when kl_importance_weighted) and
L -= entropy_coef * H (on the top-entropy tokens). With kl_agg / entropy_agg set, those two terms
are aggregated separately (module ``policy_loss_ref`` docstring). Masked positions: L = 0 exactly
and zero gradient; their inputs are replaced by 0 before any arithmetic, so inf/NaN there cannot
leak.

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
from .policy_variants import policy_term_ref

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


def _top_entropy_mask(entropy: torch.Tensor, keep: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's get_high_entropy_mask on the local batch: H >= torch.quantile(H[keep], 1 - q)."""
    kept = entropy.detach()[keep]
    if kept.numel() == 0:
        return torch.zeros_like(keep)
    threshold = torch.quantile(kept, 1.0 - quantile)
    return (entropy.detach() >= threshold) & keep


def _off_policy_mask(logp, rollout, adv, keep, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's get_off_policy_mask): keep A >= 0 or D_i <= delta."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    diff = torch.nan_to_num(rollout - logp.detach(), nan=0.0)
    seq_kl = torch.where(keep, diff, zero).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)
    return (adv >= 0) | (seq_kl <= float(threshold))


def _bt(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] (one value per sequence) or [B, T] -> [B, T] in like's dtype."""
    x = x.to(like.dtype)
    return x.unsqueeze(-1).expand_as(like) if x.dim() == 1 else x


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
    policy_weights: torch.Tensor | None = None,  # [B] or [B, T], detached (IS correction)
    rollout_logprobs: torch.Tensor | None = None,  # [B, T] log pi_rollout (off-policy mask)
    aux_num_tokens=None,  # token-mean normaliser of kl_agg / entropy_agg
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Oracle: ``(loss, per_token_loss, metrics)``; ``config`` is read by attribute only (fields
    added after the first release are read with today's defaults when absent).

    Per token: policy = term(variant) * off-policy mask * top-entropy mask * policy_weights
    (vespo takes policy_weights into its sequence weight w, gmpo as their masked geometric mean
    exp(sum_t m log(w + 1e-10) / max(1, n_i)), as verl); kl = kl_coef * KL (* rho when
    kl_importance_weighted); ent = entropy_coef * H * top-entropy mask. per_token_loss =
    policy + kl - ent; loss = agg(per_token_loss), or agg(policy) + kl_agg(kl) - entropy_agg(ent)
    with separate aggregations (the entropy one over the tokens it acts on).

    metrics: detached 0-dim float32 masked token means, keys "clip_frac_low",
    "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "ref_kl", "entropy"
    (definitions in ``fastpo.config.PolicyLossOutput``).
    """
    acc = acc_dtype(logprobs.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=logprobs.device)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x.to(acc), zero)

    logp = masked(logprobs)
    old = masked(old_logprobs)
    adv = masked(_bt(advantages, logp))
    weights = None if policy_weights is None else masked(_bt(policy_weights.detach(), logp))

    log_ratio = logp - old
    if config.logratio_clamp is not None:
        c = float(config.logratio_clamp)
        log_ratio = log_ratio.clamp(min=-c, max=c)
    term = policy_term_ref(logp, old, adv, keep, log_ratio, config,
                           rollout_weights=weights if config.variant == "vespo" else None)
    pg = term.pg
    quantile = float(getattr(config, "top_entropy_quantile", 1.0))
    ent_mask = None
    if quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs entropy")
        ent_mask = _top_entropy_mask(masked(entropy), keep, quantile)
    threshold = getattr(config, "off_policy_mask_threshold", None)
    if threshold is not None:
        rollout = old if rollout_logprobs is None else masked(rollout_logprobs.detach())
        pg = pg * _off_policy_mask(logp, rollout, adv, keep, threshold).to(acc)
    if ent_mask is not None:
        pg = pg * ent_mask.to(acc)
    if weights is not None and config.variant == "gmpo":
        seq_w = torch.exp(masked(torch.log(weights + 1e-10)).sum(-1, keepdim=True)
                          / keep.sum(-1, keepdim=True).clamp(min=1).to(acc))
        pg = pg * seq_w
    elif weights is not None and config.variant != "vespo":
        pg = pg * weights
    pg = torch.where(keep, pg, zero)

    kl = kl_term = None
    kl_coef = float(config.kl_coef)
    if ref_logprobs is not None:
        kl = kl_penalty_ref(logp, masked(ref_logprobs), config.kl_estimator, config.kl_clamp)
        if kl_coef != 0.0:
            weighted = kl * term.rho if getattr(config, "kl_importance_weighted", False) else kl
            kl_term = torch.where(keep, kl_coef * weighted, zero)
    ent = None if entropy is None else masked(entropy)
    ent_term = None
    if ent is not None and float(config.entropy_coef) != 0.0:
        ent_term = float(config.entropy_coef) * (ent if ent_mask is None else ent * ent_mask.to(acc))
        ent_term = torch.where(keep, ent_term, zero)

    per_token = pg
    for extra, sign in ((kl_term, 1.0), (ent_term, -1.0)):
        if extra is not None:
            per_token = per_token + sign * extra
    per_token = torch.where(keep, per_token, zero)

    counts = dict(num_sequences=num_sequences, agg_scale=config.agg_scale)
    kl_agg, ent_agg = getattr(config, "kl_agg", None), getattr(config, "entropy_agg", None)
    main = pg
    if kl_term is not None and kl_agg is None:
        main = main + kl_term
    if ent_term is not None and ent_agg is None:
        main = main - ent_term
    loss = aggregate_ref(main if (kl_agg or ent_agg) else per_token, keep, config.agg,
                         num_tokens=num_tokens, **counts)
    if kl_term is not None and kl_agg is not None:
        loss = loss + aggregate_ref(kl_term, keep, kl_agg, num_tokens=aux_num_tokens, **counts)
    if ent_term is not None and ent_agg is not None:
        ent_keep = keep if ent_mask is None else ent_mask
        loss = loss - aggregate_ref(ent_term, ent_keep, ent_agg, num_tokens=aux_num_tokens, **counts)

    with torch.no_grad():

        def mean(x: torch.Tensor | None) -> torch.Tensor:
            if x is None:
                return torch.zeros((), dtype=torch.float32, device=logprobs.device)
            return masked_token_mean_ref(x.detach().to(acc), keep).float()

        metrics = {
            "clip_frac_low": mean(term.low),
            "clip_frac_high": mean(term.high),
            "dual_clip_frac": mean(term.dual),
            "ratio_mean": mean(term.ratio),
            "approx_kl": mean(torch.expm1(log_ratio) - log_ratio),
            "ref_kl": mean(kl),
            "entropy": mean(ent),
        }
    return loss, per_token, metrics
