"""PPO value loss, GAE and masked whitening (public functions, plain PyTorch).

Shapes ``[B, T]``; mask nonzero = count the token. Results are float32 (float64 for float64
inputs) and exactly 0 at masked positions. Formulas in ``fastpo/reference/advantages.py``.
"""
from __future__ import annotations

import math

import torch

from fastpo.config import AGG_MODES
from fastpo.functional.policy_loss import check_bt, check_count
from fastpo.reference.advantages import (
    discounted_returns_ref,
    gae_ref,
    group_advantages_ref,
    passk_advantages_ref,
    token_rewards_ref,
    value_loss_ref,
    whiten_ref,
)

__all__ = [
    "discounted_returns",
    "gae",
    "group_advantages",
    "passk_advantages",
    "token_rewards",
    "value_loss",
    "whiten",
]


def _finite(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return v


def _check_same(x: torch.Tensor, others: dict) -> None:
    for name, y in others.items():
        if y.device != x.device:
            raise ValueError(f"{name} is on {y.device} but the first argument is on {x.device}")


def check_value_loss_args(clip, agg, agg_scale) -> None:
    if clip is not None:
        c = _finite("clip", clip)
        if c < 0.0:
            raise ValueError(f"clip must be None or a number >= 0, got {clip!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; expected one of {', '.join(AGG_MODES)}")
    if agg_scale is not None and not _finite("agg_scale", agg_scale) > 0.0:
        raise ValueError(f"agg_scale must be None or a number > 0, got {agg_scale!r}")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    num_tokens=None,
    num_sequences=None,
    agg_scale: float | None = None,
) -> torch.Tensor:
    """Clipped PPO value loss (Schulman et al. 2017), a 0-dim fp32 (fp64) tensor.

    values ``[B, T]`` (differentiable), old_values ``[B, T]`` (rollout-time values), returns
    ``[B, T]`` (targets), mask ``[B, T]``. Per token
        0.5 * max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2)
    (clip=None: 0.5 * (v - R)^2), aggregated like the policy loss: ``agg`` one of
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", with
    the same ``num_tokens`` / ``num_sequences`` / ``agg_scale`` overrides. This is TRL's and
    verl's value loss (token-mean), and OpenRLHF's ValueLoss (token_level_loss=True:
    "token-mean"; False: "seq-mean-token-mean").
    """
    check_bt("values", values, None)
    shape = tuple(values.shape)
    check_bt("old_values", old_values, shape)
    check_bt("returns", returns, shape)
    check_bt("mask", mask, shape, mask=True)
    _check_same(values, {"old_values": old_values, "returns": returns, "mask": mask})
    check_value_loss_args(clip, agg, agg_scale)
    check_count("num_tokens", num_tokens)
    check_count("num_sequences", num_sequences)
    return value_loss_ref(
        values,
        old_values,
        returns,
        mask,
        clip=clip,
        agg=agg,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        agg_scale=agg_scale,
    )


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) -> ``(advantages, returns)``.

    rewards, values, mask ``[B, T]``. With "next" the next position whose mask is 1 (value 0
    past the end of the sequence):
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next,     returns_t = A_t + V_t
    Masked positions are skipped (transparent, as in verl: rewards there are ignored) and get
    0 in both outputs. Outputs are detached (they are targets) and not whitened: call
    ``whiten(advantages, mask)`` for the usual normalisation. 0 <= gamma, lam <= 1.
    """
    check_bt("rewards", rewards, None)
    shape = tuple(rewards.shape)
    check_bt("values", values, shape)
    check_bt("mask", mask, shape, mask=True)
    _check_same(rewards, {"values": values, "mask": mask})
    g = _finite("gamma", gamma, 0.0, 1.0)
    lam_f = _finite("lam", lam, 0.0, 1.0)
    return gae_ref(rewards, values, mask, gamma=g, lam=lam_f)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    *,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> torch.Tensor:
    """Masked whitening over the whole batch, shaped like ``x``; 0 where mask is 0.

    ``(x - mean) / sqrt(var + eps)`` with mean and var (Bessel-corrected, n - 1) over the
    tokens where mask is nonzero; ``shift_mean=False`` adds the mean back (TRL's and verl's
    ``masked_whiten``). Fewer than two counted tokens give 0 instead of NaN. Differentiable.
    ``unbiased=False`` uses the population variance (divide by n): OpenRLHF's advantage
    normalisation (which takes rsqrt(max(var, eps)); identical for var >> eps).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("x and mask must be torch.Tensor")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or floating-point, got {mask.dtype}")
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"mask must have the shape of x {list(x.shape)}, got {list(mask.shape)}")
    _check_same(x, {"mask": mask})
    e = _finite("eps", eps)
    if e < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return whiten_ref(x, mask, bool(shift_mean), e, bool(unbiased))


def _rewards_1d(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must have shape [B] (non-empty), got {list(x.shape)}")
    return x


def _check_groups(rewards: torch.Tensor, group_size, group_ids, *, min_size: int = 1) -> None:
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (consecutive groups) or group_ids")
    n = rewards.shape[0]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < min_size:
            raise ValueError(f"group_size must be an integer >= {min_size}, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"B = {n} rewards do not split into groups of group_size = {group_size}")
        return
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype.is_floating_point or group_ids.is_complex():
        raise ValueError("group_ids must be an integer (or bool) tensor of shape [B]")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(f"group_ids must have shape [B] = [{n}], got {list(group_ids.shape)}")
    if min_size > 1:
        _, counts = torch.unique(group_ids, return_counts=True)
        if int(counts.min()) < min_size:
            raise ValueError(f"every group needs at least {min_size} members")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-6,
    singleton: str = "zero",
    baseline_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative outcome advantages ``[B]`` (fp32; fp64 for fp64 rewards; no gradient).

    Groups: consecutive runs of ``group_size`` (TRL's, verl's and OpenRLHF's layout) or any
    integer labels ``group_ids`` ``[B]`` (verl's uid). Over the finite rewards of each group:
    ``A = (r - b) / (std + eps)`` with b the group mean (``baseline="mean"``; weighted by
    ``baseline_weights`` if given), the leave-one-out mean (``"loo"``) or 0 (``"none"``), std
    the group's (``scale="group"``, Bessel), the batch's (``"batch"``), or no division
    (``"none"``). NaN rewards (unscorable) are excluded and get 0. A group with at most one
    finite reward: ``singleton="zero"`` gives 0 (TRL), ``"reward"`` uses b = 0, std = 1 (verl).

    ========================  =============================================================
    estimator                 call
    ========================  =============================================================
    GRPO (TRL)                group_advantages(r, G, eps=1e-4)  (scale="batch" for TRL's
                              scale_rewards="batch", scale="none" for "none")
    GRPO (verl)               group_advantages(r, group_ids=uid, singleton="reward")
    Dr. GRPO                  scale="none"
    RLOO (TRL / verl)         baseline="loo", scale="none" (verl: singleton="reward")
    OpenRLHF group_norm       eps=1e-9; rloo: baseline="loo", scale="none";
                              reinforce_baseline / dr_grpo: scale="none", then
                              whiten(A[:, None] * mask, mask, unbiased=False) for the former
    REINFORCE++-baseline      verl: whiten(group_advantages(r, group_ids=uid, scale="none",
                              singleton="reward")[:, None].expand(B, T), mask)
    OPO (verl)                scale="none", singleton="reward", baseline_weights=lengths
    ========================  =============================================================
    Broadcast to tokens with ``A[:, None] * mask`` (or pass ``[B]`` advantages directly).
    """
    _rewards_1d("rewards", rewards)
    _check_groups(rewards, group_size, group_ids)
    _choice("baseline", baseline, ("mean", "loo", "none"))
    _choice("scale", scale, ("group", "batch", "none"))
    _choice("singleton", singleton, ("zero", "reward"))
    e = _finite("eps", eps)
    if e < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if baseline_weights is not None:
        _rewards_1d("baseline_weights", baseline_weights)
        if baseline_weights.shape != rewards.shape:
            raise ValueError(f"baseline_weights must have shape [B] = [{rewards.shape[0]}]")
        _check_same(rewards, {"baseline_weights": baseline_weights})
    if group_ids is not None:
        _check_same(rewards, {"group_ids": group_ids})
    return group_advantages_ref(rewards, group_size, group_ids=group_ids, baseline=baseline, scale=scale,
                                eps=e, singleton=singleton, baseline_weights=baseline_weights)


def passk_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO pass@k advantages ``[B]`` (Chen et al. 2025, arXiv:2503.19595; verl ``grpo_passk``).

    In each group (at least 2 members) only the best response gets ``r_max - r_second_max``,
    divided by the group's std (Bessel) + eps when ``scale="group"`` (verl's
    norm_adv_by_std_in_grpo); every other response gets 0. NaN rewards are excluded (0); a
    group with fewer than two finite rewards gives 0; ties give 0. No gradient.
    """
    _rewards_1d("rewards", rewards)
    _check_groups(rewards, group_size, group_ids, min_size=2)
    _choice("scale", scale, ("group", "none"))
    e = _finite("eps", eps)
    if e < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if group_ids is not None:
        _check_same(rewards, {"group_ids": group_ids})
    return passk_advantages_ref(rewards, group_size, group_ids=group_ids, scale=scale, eps=e)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    reset_at_masked: bool = False,
) -> torch.Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_next`` ``[B, T]`` (no gradient).

    REINFORCE++ (Hu 2025; verl ``reinforce_plus_plus``, then ``whiten(G, mask)``; OpenRLHF
    ``reinforce``, then ``whiten(G, mask, unbiased=False)``) and ReMax (``G - baseline[:, None]``,
    gamma = 1). "next" is the next kept position (masked positions are transparent and their
    rewards ignored); ``reset_at_masked=True`` is verl's reset after EOS: the return does not
    carry across a masked position. For right-padded rows both agree, and agree with OpenRLHF's
    ``get_cumulative_returns``. 0 at masked positions; 0 <= gamma <= 1.
    """
    check_bt("rewards", rewards, None)
    check_bt("mask", mask, tuple(rewards.shape), mask=True)
    _check_same(rewards, {"mask": mask})
    g = _finite("gamma", gamma, 0.0, 1.0)
    return discounted_returns_ref(rewards, mask, gamma=g, reset_at_masked=bool(reset_at_masked))


def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """KL-shaped per-token rewards ``[B, T]`` (OpenRLHF ``compute_reward``; the PPO / REINFORCE++
    reward of the seeds): ``-kl_coef * kl_t`` at every kept token, plus ``scores[i]`` at the last
    kept token of row i. A fully masked row is all 0. No gradient. Feed to ``gae`` or
    ``discounted_returns``.
    """
    _rewards_1d("scores", scores)
    check_bt("mask", mask, None, mask=True)
    if mask.shape[0] != scores.shape[0]:
        raise ValueError(f"mask must have B = {scores.shape[0]} rows (like scores), got {list(mask.shape)}")
    if kl is not None:
        check_bt("kl", kl, tuple(mask.shape))
        _check_same(scores, {"kl": kl})
    _check_same(scores, {"mask": mask})
    c = _finite("kl_coef", kl_coef)
    if kl is None and c != 0.0:
        raise ValueError(f"kl_coef = {kl_coef} needs kl ([B, T] per-token KL estimate)")
    return token_rewards_ref(scores, mask, kl=kl, kl_coef=c)
