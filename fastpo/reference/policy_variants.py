"""Reference per-token policy terms of every ``PolicyLossConfig.variant`` (before masks, weights,
KL and entropy; ``policy_loss_ref`` composes them).

Inputs are already masked (0 at masked positions) and in the accumulation dtype: ``logp``,
``old`` ``[B, T]``, ``adv`` ``[B, T]``, ``keep`` bool ``[B, T]``, ``log_ratio`` = logp - old after
the optional ``logratio_clamp``. n_i = sum_t keep. Each function returns a ``PolicyTerm``:

    pg      [B, T] policy loss per token
    rho     [B, T] the differentiable ratio the KL term is weighted by when
            ``kl_importance_weighted`` (before ratio_cap and clipping)
    ratio   [B, T] the ratio reported as the "ratio_mean" metric
    low, high, dual  bool [B, T]: where the lower clip, upper clip, dual clip is active

Formulas (A the advantage, r = exp(log_ratio), lo = 1 - clip_low, hi = 1 + clip_high):

    ppo    max(-A min(r, ratio_cap), -A clip(r, lo, hi)); dual clip where A < 0: min(., -c A)
    gspo   the same with the sequence ratio s: log s_i = sum_t m log_ratio / max(1, n_i)
           ("mean", GSPO) or sum_t m log_ratio ("sum", TRL's RLOO), optionally clamped to at most
           ``seq_logratio_max`` (verl: 10); "token" gradient form exp(sg[log s_i] + logp - sg[logp])
           (verl), "sequence" form s_i differentiable through every token (TRL, OpenRLHF)
    cispo  -sg[clip(r, lo, hi)] A logp
    sapo   -A (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos where A > 0 else tau_neg (SAPO)
    pg     -A logp (verl's gpg)
    gmpo   c = sign(A) * min(sign(A) log_ratio, sign(A) clamp(log_ratio, log lo, log hi)),
           R_i = exp(sum_t m c / max(1, n_i)), every token carries -Abar_i R_i, Abar_i the masked
           mean advantage (verl's geo_mean; sign(A) per token as verl, which equals the sign of
           Abar_i for per-sequence advantages, the case GMPO defines)
    vespo  -sg[phi] A logp, log w_i = clamp(sum_t m clamp(logp - old, +-20) + sum_t m clamp(log
           rho_rollout, log 1e-8, 20), log 1e-8, 20), phi = exp(lam + k log w - lam w), non-finite
           phi -> 0, (k, lam) by the sign of A (A >= 0: the _pos pair), lam >= 1e-4 (TRL)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["PolicyTerm", "policy_term_ref"]

_VESPO_LOW = math.log(1e-8)


class PolicyTerm(NamedTuple):
    pg: torch.Tensor
    rho: torch.Tensor
    ratio: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    dual: torch.Tensor


def _full(value, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim constant in like's dtype (torch.where on Python floats would round to float32)."""
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _counts(keep: torch.Tensor, dtype) -> torch.Tensor:
    return keep.sum(-1, keepdim=True).clamp(min=1).to(dtype)


def _clipped_surrogate(ratio, adv, config, lo, hi):
    """ppo / gspo: the clipped surrogate with ratio_cap and dual clip."""
    clipped = ratio.clamp(min=lo, max=hi)
    unclipped = ratio if config.ratio_cap is None else ratio.clamp(max=float(config.ratio_cap))
    pg = torch.maximum(-adv * unclipped, -adv * clipped)
    low = (adv < 0) & (unclipped < lo)
    high = (adv > 0) & (unclipped > hi)
    dual = torch.zeros_like(low)
    if config.dual_clip is not None:
        bound = -adv * float(config.dual_clip)
        dual = (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    return pg, low, high, dual


def _gspo_ratio(logp, log_ratio, keep, config):
    total = log_ratio.sum(-1, keepdim=True)
    seq_log = total if getattr(config, "seq_ratio", "mean") == "sum" else total / _counts(keep, logp.dtype)
    cap = getattr(config, "seq_logratio_max", None)
    if getattr(config, "seq_ratio_grad", "token") == "sequence":
        if cap is not None:
            seq_log = seq_log.clamp(max=float(cap))
        return torch.exp(seq_log).expand_as(logp)
    token_form = seq_log.detach() + (logp - logp.detach())
    if cap is not None:
        token_form = token_form.clamp(max=float(cap))
    return torch.exp(token_form)


def _gmpo(log_ratio, adv, keep, lo, hi):
    sign = torch.sign(adv)
    log_lo = math.log(lo) if lo > 0 else -math.inf
    bounded = log_ratio.clamp(min=log_lo, max=math.log(hi))
    c = sign * torch.minimum(sign * log_ratio, sign * bounded)
    counts = _counts(keep, log_ratio.dtype)
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    c = torch.where(keep, c, zero)
    seq_ratio = torch.exp(c.sum(-1, keepdim=True) / counts)
    seq_adv = torch.where(keep, adv, zero).sum(-1, keepdim=True) / counts
    pg = (-seq_adv * seq_ratio).expand_as(log_ratio)
    low = (adv < 0) & (log_ratio < log_lo)
    high = (adv > 0) & (log_ratio > math.log(hi))
    return pg, seq_ratio.expand_as(log_ratio), low, high


@torch.no_grad()
def vespo_weights_ref(logp, old, adv, keep, config, rollout_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """VESPO's detached Gamma weight phi ``[B, T]`` and sequence weight w ``[B, T]`` (TRL)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_w = torch.where(keep, (logp - old).clamp(-20.0, 20.0), zero).sum(-1, keepdim=True)
    if rollout_weights is not None:
        log_is = torch.log(rollout_weights).clamp(_VESPO_LOW, 20.0)
        log_w = log_w + torch.where(keep, log_is, zero).sum(-1, keepdim=True)
    log_w = log_w.clamp(_VESPO_LOW, 20.0)
    w = torch.exp(log_w)
    nonneg = adv >= 0
    k = torch.where(nonneg, _full(config.vespo_k_pos, logp), _full(config.vespo_k_neg, logp))
    lam = torch.where(nonneg, _full(config.vespo_lambda_pos, logp), _full(config.vespo_lambda_neg, logp))
    lam = lam.clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return phi, w.expand_as(logp)


def policy_term_ref(logp, old, adv, keep, log_ratio, config, rollout_weights=None) -> PolicyTerm:
    """The per-token policy term of ``config.variant`` (module docstring)."""
    variant = config.variant
    lo, hi = 1.0 - float(config.clip_low), 1.0 + float(config.clip_high)
    ratio = torch.exp(log_ratio)
    no = torch.zeros_like(keep)
    if variant == "ppo":
        pg, low, high, dual = _clipped_surrogate(ratio, adv, config, lo, hi)
        return PolicyTerm(pg, ratio, ratio, low, high, dual)
    if variant == "gspo":
        seq_ratio = _gspo_ratio(logp, log_ratio, keep, config)
        pg, low, high, dual = _clipped_surrogate(seq_ratio, adv, config, lo, hi)
        return PolicyTerm(pg, seq_ratio, seq_ratio, low, high, dual)
    if variant == "cispo":
        pg = -ratio.clamp(min=lo, max=hi).detach() * adv * logp
        return PolicyTerm(pg, ratio, ratio, ratio < lo, ratio > hi, no)
    if variant == "sapo":
        pos, neg = float(config.sapo_tau_pos), float(config.sapo_tau_neg)
        tau = torch.where(adv > 0, _full(pos, logp), _full(neg, logp))
        pg = -adv * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        return PolicyTerm(pg, ratio, ratio, no, no, no)
    if variant == "pg":
        return PolicyTerm(-adv * logp, ratio, ratio, no, no, no)
    if variant == "gmpo":
        pg, seq_ratio, low, high = _gmpo(log_ratio, adv, keep, lo, hi)
        return PolicyTerm(pg, ratio, seq_ratio, low, high, no)
    if variant == "vespo":
        phi, w = vespo_weights_ref(logp, old, adv, keep, config, rollout_weights)
        return PolicyTerm(-phi * adv * logp, ratio, w, no, no, no)
    raise ValueError(f"unknown variant {variant!r}")
