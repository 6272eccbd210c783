"""Rollout correction (public helpers, plain PyTorch, no gradient): importance-sampling weights
and rejection masks for tokens sampled by an inference engine whose log-probs differ from the
trainer's. Formulas in ``fastpo/reference/rollout.py``; feed the weights to ``policy_weights``
of ``policy_loss_from_logprobs`` / ``policy_loss`` and the mask to their ``mask``.
"""
from __future__ import annotations

import math

import torch

from fastpo.functional.policy_loss import check_bt
from fastpo.reference.rollout import REJECTION_CRITERIA, rollout_is_weights_ref, rollout_rejection_mask_ref

__all__ = ["REJECTION_CRITERIA", "rollout_is_weights", "rollout_rejection_mask"]


def _check_pair(old_logprobs, rollout_logprobs, mask) -> None:
    check_bt("old_logprobs", old_logprobs, None)
    shape = tuple(old_logprobs.shape)
    check_bt("rollout_logprobs", rollout_logprobs, shape)
    check_bt("mask", mask, shape, mask=True)
    for name, x in (("rollout_logprobs", rollout_logprobs), ("mask", mask)):
        if x.device != old_logprobs.device:
            raise ValueError(f"old_logprobs are on {old_logprobs.device} but {name} is on {x.device}")


def _bound(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be None or a number > 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None or a number > 0, got {value!r}") from None
    if not (v > 0.0 and not math.isnan(v)):
        raise ValueError(f"{name} must be None or a number > 0, got {value!r}")
    return v


def rollout_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    low: float | None = None,
    high: float | None = 2.0,
    log_clamp: float | None = 20.0,
    batch_normalize: bool = False,
) -> torch.Tensor:
    """Rollout importance-sampling weights ``[B, T]`` for ``policy_weights`` (no gradient).

    With lr = old_logprobs - rollout_logprobs (NaN, an engine that could not score a token,
    counts as 0): log w = lr (``level="token"``), the masked sum over the sequence
    (``"sequence"``) or its masked mean (``"geometric"``), clamped to +-log_clamp (None: no
    clamp); w = exp(log w), then ``mode="truncate"`` clamps it to [low, high] (TIS) and
    ``"mask"`` zeroes it outside [low, high] (MIS); None bounds are open. ``batch_normalize``
    divides by the mean weight (kept tokens; sequences for the sequence levels), as verl.
    float32 (float64 for float64 input); 0 at masked positions.

    =====================================  ====================================================
    library option                         call
    =====================================  ====================================================
    TRL vllm_importance_sampling_mode      level="token" / "sequence", mode="truncate" / "mask",
      token_* / sequence_*                 low=clip_min, high=clip_max (3.0), log_clamp=None
    verl rollout_is="token" / "sequence"   level=..., high=rollout_is_threshold (2.0),
                                           batch_normalize=rollout_is_batch_normalize
    OpenRLHF tis                           low, high = is_correction_threshold, log_clamp=None
    OpenRLHF icepop                        mode="mask", low, high, log_clamp=None
    OpenRLHF seq-mask-tis                  rollout_is_weights(..., high=None, log_clamp=None)
                                           * (rollout_is_weights(..., level="geometric",
                                           mode="mask", low=low, high=high) > 0)
    =====================================  ====================================================
    """
    _check_pair(old_logprobs, rollout_logprobs, mask)
    if level not in ("token", "sequence", "geometric"):
        raise ValueError(f"unknown level {level!r}; expected 'token', 'sequence' or 'geometric'")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"unknown mode {mode!r}; expected 'truncate' or 'mask'")
    lo, hi = _bound("low", low), _bound("high", high)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"low = {low} must not exceed high = {high}")
    clamp = _bound("log_clamp", log_clamp)
    return rollout_is_weights_ref(old_logprobs, rollout_logprobs, mask, level=level, mode=mode, low=lo, high=hi,
                                  log_clamp=clamp, batch_normalize=bool(batch_normalize))


def rollout_rejection_mask(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    criteria,
    thresholds,
) -> torch.Tensor:
    """verl's rollout rejection sampling: bool ``[B, T]``, True where the token is kept.

    ``criteria``: a comma-separated string or a list of ``token_k1/k2/k3``,
    ``seq_sum_k1/k2/k3``, ``seq_mean_k1/k2/k3``, ``seq_max_k2/k3`` (all must pass).
    ``thresholds``: one shared value or one per criterion, as numbers, ``(lower, upper)``
    tuples, or verl's string (``"0.5_2.0,0.01"``). k1 criteria keep
    ``log(lower) <= stat <= log(upper)`` (a single number u means (1/u, u)), the others
    ``stat <= upper``. Statistics from lr = clamp(old - rollout, +-20): k1 = -lr,
    k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr; sequence criteria use the masked sum / mean
    (mean by max(1, n); verl adds 1e-8) / max over the row. NaN log-probs fail the criterion
    (the token, or its sequence). Use as ``mask & rollout_rejection_mask(...)``. No gradient.
    """
    _check_pair(old_logprobs, rollout_logprobs, mask)
    return rollout_rejection_mask_ref(old_logprobs, rollout_logprobs, mask, criteria, thresholds)
