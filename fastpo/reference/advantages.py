"""Reference value loss, generalized advantage estimation and masked whitening.

Shapes ``[B, T]``; mask nonzero = count the token. Computed in float64 for float64 inputs
(the first tensor argument decides), else float32; results come back in that dtype and are
exactly 0 at masked positions, whose inputs never enter the arithmetic.

value_loss  (PPO value head, Schulman et al. 2017; clipped form as in OpenAI baselines,
            TRL, verl and OpenRLHF):
    v_clip = clamp(v, v_old - clip, v_old + clip)
    L_t    = 0.5 * max((v - R)^2, (v_clip - R)^2)        (clip=None: 0.5 * (v - R)^2)
    loss   = aggregate_ref(L, mask, agg, ...)            (same four modes as the policy loss)

gae  (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"):
    delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,
    returns_t = A_t + V_t, where "next" is the next position whose mask is 1 (0 past the end):
    masked positions are transparent, as in verl (e.g. tool-output tokens inside a response);
    for right-padded responses this is the textbook recursion. No gradient flows (targets).

whiten  (masked_whiten of TRL / verl): (x - mean) / sqrt(var + eps) over the masked tokens of
    the whole batch, var with Bessel's correction (n - 1, at least 1); shift_mean=False adds the
    mean back. Fewer than two tokens: centred values are 0, so the result is 0 (no NaN).
    unbiased=False: population variance (divide by n), as OpenRLHF's advantage normalisation
    (which uses rsqrt(max(var, eps)) where this uses rsqrt(var + eps)).

Outcome-reward advantage estimators (no gradient; rewards ``[B]``, one per sequence):

group_advantages  per group g (ids from group_size: i // group_size, or group_ids), over the
    finite rewards of the group (NaN rewards are excluded everywhere and get advantage 0):
        baseline "mean" b_i = sum_g w r / sum_g w (w = baseline_weights, default 1; OPO uses
                 the lengths), "loo" b_i = the same over the group without i (RLOO), "none" 0
        scale    "group" std_g (Bessel, over the group's finite rewards), "batch" the std of all
                 finite rewards (TRL scale_rewards="batch"), "none" 1
        A_i = (r_i - b_i) / (scale_i + eps)     (scale "none": r_i - b_i)
    A group with at most one finite reward: singleton="zero" A = 0 (TRL), "reward" b = 0 and
    std_g = 1 (verl). Batch scale with fewer than two finite rewards: A = 0 (TRL).
passk_advantages  GRPO pass@k (Chen et al. 2025, arXiv:2503.19595; verl grpo_passk): in each
    group only the best response gets r_max - r_second, divided by std_g + eps (scale "group");
    ties give 0; a group with fewer than two finite rewards gives 0.
discounted_returns  G_t = r_t + gamma G_next (REINFORCE++, ReMax): "next" is the next kept
    position (masked ones are transparent), or with reset_at_masked the very next position,
    whose return counts only if kept (verl's REINFORCE++ reset after EOS). 0 at masked positions.
token_rewards  the KL-shaped per-token reward of PPO / REINFORCE++ (OpenRLHF compute_reward):
    -kl_coef * kl_t at every kept token, plus the sequence score at its last kept token.
"""
from __future__ import annotations

import math

import torch

from ._dtypes import acc_dtype, keep_mask

from .policy_loss import aggregate_ref

__all__ = [
    "discounted_returns_ref",
    "gae_ref",
    "group_advantages_ref",
    "passk_advantages_ref",
    "token_rewards_ref",
    "value_loss_ref",
    "whiten_ref",
]


def value_loss_ref(
    values: torch.Tensor,  # [B, T] current value predictions
    old_values: torch.Tensor,  # [B, T] values at rollout time
    returns: torch.Tensor,  # [B, T] targets
    mask: torch.Tensor,  # [B, T]
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    num_tokens=None,
    num_sequences=None,
    agg_scale=None,
) -> torch.Tensor:
    """Clipped PPO value loss, 0-dim (fp32; fp64 for fp64 values)."""
    acc = acc_dtype(values.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=values.device)
    v = torch.where(keep, values.to(acc), zero)
    v_old = torch.where(keep, old_values.to(acc), zero)
    ret = torch.where(keep, returns.to(acc), zero)
    per_token = (v - ret).square()
    if clip is not None:
        c = float(clip)
        v_clip = torch.clamp(v, v_old - c, v_old + c)
        per_token = torch.maximum(per_token, (v_clip - ret).square())
    per_token = torch.where(keep, 0.5 * per_token, zero)
    return aggregate_ref(
        per_token, keep, agg, num_tokens=num_tokens, num_sequences=num_sequences, agg_scale=agg_scale
    )


def gae_ref(
    rewards: torch.Tensor,  # [B, T] per-token rewards
    values: torch.Tensor,  # [B, T] value estimates
    mask: torch.Tensor,  # [B, T]
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, each ``[B, T]``, detached, 0 where mask is 0."""
    acc = acc_dtype(rewards.dtype)
    keep = keep_mask(mask)
    with torch.no_grad():
        zero = torch.zeros((), dtype=acc, device=rewards.device)
        r = torch.where(keep, rewards.detach().to(acc), zero)
        v = torch.where(keep, values.detach().to(acc), zero)
        batch, length = r.shape
        next_value = torch.zeros(batch, dtype=acc, device=r.device)
        next_adv = torch.zeros(batch, dtype=acc, device=r.device)
        advantages = torch.zeros_like(r)
        for t in reversed(range(length)):
            k = keep[:, t]
            delta = r[:, t] + gamma * next_value - v[:, t]
            adv_t = delta + gamma * lam * next_adv
            next_value = torch.where(k, v[:, t], next_value)
            next_adv = torch.where(k, adv_t, next_adv)
            advantages[:, t] = torch.where(k, adv_t, zero)
        returns = torch.where(keep, advantages + v, zero)
    return advantages, returns


def whiten_ref(
    x: torch.Tensor,  # [B, T] (any shape matching mask)
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> torch.Tensor:
    """Masked whitening over all masked tokens of the batch; 0 where mask is 0. Differentiable."""
    acc = acc_dtype(x.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=x.device)
    xs = torch.where(keep, x.to(acc), zero)
    count = keep.sum().to(acc)
    mean = xs.sum() / count.clamp(min=1)
    centred = torch.where(keep, xs - mean, zero)
    var = centred.square().sum() / ((count - 1) if unbiased else count).clamp(min=1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, zero)


def _group_index(n: int, group_size, group_ids, device) -> tuple[torch.Tensor, int]:
    if group_ids is not None:
        unique, inverse = torch.unique(group_ids.to(device), return_inverse=True)
        return inverse, unique.numel()
    return torch.arange(n, device=device) // int(group_size), n // int(group_size)


def _group_sum(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


@torch.no_grad()
def group_advantages_ref(
    rewards: torch.Tensor,  # [B]
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,  # [B] any integer labels
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "zero",
    baseline_weights: torch.Tensor | None = None,  # [B]
) -> torch.Tensor:
    """``[B]`` group-relative advantages (module docstring)."""
    acc = acc_dtype(rewards.dtype)
    r = rewards.detach().to(acc)
    index, groups = _group_index(r.shape[0], group_size, group_ids, r.device)
    finite = ~torch.isnan(r)
    zero = torch.zeros((), dtype=acc, device=r.device)
    rz = torch.where(finite, r, zero)
    fin = finite.to(acc)
    count = _group_sum(fin, index, groups)[index]
    w = fin if baseline_weights is None else fin * baseline_weights.detach().to(acc)
    sum_w, sum_wr = _group_sum(w, index, groups)[index], _group_sum(w * rz, index, groups)[index]
    if baseline == "mean":
        base = sum_wr / sum_w
    elif baseline == "loo":
        base = (sum_wr - w * rz) / (sum_w - w)
    else:
        base = torch.zeros_like(r)
    single = count <= 1
    if singleton == "reward":
        base = torch.where(single, zero, base)
    adv = rz - base
    if scale == "group":
        mean = _group_sum(rz, index, groups)[index] / count.clamp(min=1)
        var = _group_sum(torch.where(finite, (rz - mean).square(), zero), index, groups)[index]
        std = torch.sqrt(var / (count - 1).clamp(min=1))
        if singleton == "reward":
            std = torch.where(single, torch.ones((), dtype=acc, device=r.device), std)
        adv = adv / (std + eps)
    elif scale == "batch":
        n = fin.sum()
        mean = rz.sum() / n.clamp(min=1)
        std = torch.sqrt(torch.where(finite, (rz - mean).square(), zero).sum() / (n - 1).clamp(min=1))
        adv = torch.where(n > 1, adv / (std + eps), zero)
    bad = ~finite | single if singleton == "zero" else ~finite
    return torch.where(bad, zero, adv)


@torch.no_grad()
def passk_advantages_ref(
    rewards: torch.Tensor,  # [B]
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """``[B]`` pass@k advantages: only each group's best response is nonzero (module docstring)."""
    acc = acc_dtype(rewards.dtype)
    r = rewards.detach().to(acc)
    n = r.shape[0]
    index, groups = _group_index(n, group_size, group_ids, r.device)
    finite = ~torch.isnan(r)
    neg_inf = torch.full((), -math.inf, dtype=acc, device=r.device)
    rf = torch.where(finite, r, neg_inf)
    best = torch.full((groups,), -math.inf, dtype=acc, device=r.device).scatter_reduce(0, index, rf, "amax")
    position = torch.arange(n, device=r.device)
    is_best = finite & (rf == best[index])
    first = torch.full((groups,), n, dtype=torch.long, device=r.device).scatter_reduce(
        0, index, torch.where(is_best, position, torch.full_like(position, n)), "amin")
    without = torch.where(position == first[index], neg_inf, rf)
    second = torch.full((groups,), -math.inf, dtype=acc, device=r.device).scatter_reduce(0, index, without, "amax")
    gap = best - second
    gap = torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap))
    if scale == "group":
        fin = finite.to(acc)
        zero = torch.zeros((), dtype=acc, device=r.device)
        rz = torch.where(finite, r, zero)
        count = _group_sum(fin, index, groups)
        mean = _group_sum(rz, index, groups) / count.clamp(min=1)
        var = _group_sum(torch.where(finite, (rz - mean[index]).square(), zero), index, groups)
        gap = gap / (torch.sqrt(var / (count - 1).clamp(min=1)) + eps)
    out = torch.zeros_like(r)
    valid = first < n
    out[first[valid]] = gap[valid]
    return out


@torch.no_grad()
def discounted_returns_ref(
    rewards: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    *,
    gamma: float = 1.0,
    reset_at_masked: bool = False,
) -> torch.Tensor:
    """``[B, T]`` discounted reward-to-go, 0 at masked positions (module docstring)."""
    acc = acc_dtype(rewards.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=rewards.device)
    r = torch.where(keep, rewards.detach().to(acc), zero)
    running = torch.zeros(r.shape[0], dtype=acc, device=r.device)
    out = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        k = keep[:, t]
        step = r[:, t] + gamma * running
        running = torch.where(k, step, zero if reset_at_masked else running)
        out[:, t] = torch.where(k, step, zero)
    return out


@torch.no_grad()
def token_rewards_ref(
    scores: torch.Tensor,  # [B] sequence-level reward
    mask: torch.Tensor,  # [B, T]
    *,
    kl: torch.Tensor | None = None,  # [B, T] per-token KL estimate
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """``[B, T]`` per-token rewards: score at the last kept token, -kl_coef * kl everywhere kept."""
    acc = acc_dtype(scores.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=scores.device)
    length = keep.shape[1]
    last = length - 1 - keep.long().flip(-1).argmax(-1)
    is_last = (torch.arange(length, device=keep.device)[None, :] == last[:, None]) & keep
    out = torch.where(is_last, scores.detach().to(acc)[:, None], zero)
    if kl is not None and float(kl_coef) != 0.0:
        out = out - float(kl_coef) * torch.where(keep, kl.detach().to(acc), zero)
    return torch.where(keep, out, zero)
