"""PPO value loss, GAE and masked whitening (public functions, plain PyTorch).

Shapes ``[B, T]``; mask nonzero = count the token. Results are float32 (float64 for float64
inputs) and exactly 0 at masked positions. Formulas in ``fastpo/reference/advantages.py``.
"""
from __future__ import annotations

import math

import torch

from fastpo.config import AGG_MODES
from fastpo.functional.policy_loss import check_bt, check_count
from fastpo.reference.advantages import gae_ref, value_loss_ref, whiten_ref

__all__ = ["gae", "value_loss", "whiten"]


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
) -> torch.Tensor:
    """Masked whitening over the whole batch, shaped like ``x``; 0 where mask is 0.

    ``(x - mean) / sqrt(var + eps)`` with mean and var (Bessel-corrected, n - 1) over the
    tokens where mask is nonzero; ``shift_mean=False`` adds the mean back (TRL's and verl's
    ``masked_whiten``). Fewer than two counted tokens give 0 instead of NaN. Differentiable.
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
    return whiten_ref(x, mask, bool(shift_mean), e)
