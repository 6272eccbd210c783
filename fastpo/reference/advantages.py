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
"""
from __future__ import annotations

import torch

from ._dtypes import acc_dtype, keep_mask

from .policy_loss import aggregate_ref

__all__ = ["gae_ref", "value_loss_ref", "whiten_ref"]


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
) -> torch.Tensor:
    """Masked whitening over all masked tokens of the batch; 0 where mask is 0. Differentiable."""
    acc = acc_dtype(x.dtype)
    keep = keep_mask(mask)
    zero = torch.zeros((), dtype=acc, device=x.device)
    xs = torch.where(keep, x.to(acc), zero)
    count = keep.sum().to(acc)
    mean = xs.sum() / count.clamp(min=1)
    centred = torch.where(keep, xs - mean, zero)
    var = centred.square().sum() / (count - 1).clamp(min=1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, zero)
