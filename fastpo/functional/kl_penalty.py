"""Per-token KL penalty between the policy and a reference policy (public function).

Plain PyTorch: the op is elementwise on ``[B, T]`` log-probs (nothing to fuse on its own);
the fused-from-logits policy loss computes the same estimators inside its kernel.
"""
from __future__ import annotations

import math

import torch

from fastpo.config import KL_ESTIMATORS
from fastpo.reference.kl_penalty import kl_penalty_ref

__all__ = ["kl_penalty"]


def _check_kl_args(logprobs, ref_logprobs, estimator, clamp) -> None:
    for name, x in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if tuple(logprobs.shape) != tuple(ref_logprobs.shape):
        raise ValueError(
            f"logprobs shape {tuple(logprobs.shape)} and ref_logprobs shape "
            f"{tuple(ref_logprobs.shape)} must be equal"
        )
    if logprobs.device != ref_logprobs.device:
        raise ValueError(f"logprobs are on {logprobs.device} but ref_logprobs are on {ref_logprobs.device}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    if clamp is not None:
        try:
            c = float(clamp)
        except (TypeError, ValueError):
            raise ValueError(f"clamp must be None or a number > 0, got {clamp!r}") from None
        if not c > 0.0 or math.isnan(c):
            raise ValueError(f"clamp must be None or a number > 0, got {clamp!r}")


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs.

    logprobs, ref_logprobs: same shape (typically ``[B, T]``), any float dtype. Returns that
    shape in float32 (float64 for float64 ``logprobs``), differentiable in both inputs.
    Unmasked: multiply by a mask and aggregate yourself, or use ``kl_coef`` in
    ``PolicyLossConfig``.

    With d = logprobs - ref_logprobs (J. Schulman, "Approximating KL divergence", 2020):
        "k1"  d
        "k2"  d^2 / 2
        "k3"  exp(-d) + d - 1      (verl "low_var_kl" = k3 with clamp=10)
        "abs" |d|
    A "+" suffix ("k1+", "k2+", "k3+", "abs+") keeps that estimator's value and takes the
    gradient of k2, whose expectation is the true KL gradient (straight-through, as verl's
    "k3+"): ``k2 - sg[k2] + sg[value]``.
    clamp: c > 0 clamps the value to [-c, c] (gradient 0 where clamped; the "+" gradient is
    not clamped). With c set the result and its gradient are finite for any finite inputs.
    """
    _check_kl_args(logprobs, ref_logprobs, estimator, clamp)
    return kl_penalty_ref(logprobs, ref_logprobs, estimator, clamp)
