"""Reference per-token KL estimators between the policy and a reference policy.

With d = logp - ref (log pi_theta - log pi_ref at the sampled token), Schulman's
estimators of KL(pi_theta || pi_ref) ("Approximating KL divergence", 2020):

    k1  = d                         unbiased, high variance, can be negative
    k2  = d^2 / 2                   biased, low variance; its gradient d * grad(logp) is the
                                    unbiased on-policy gradient of the KL
    k3  = exp(-d) + d - 1           unbiased, low variance, >= 0 ("low_var_kl" in verl)
    abs = |d|

Suffix "+" (verl's straight-through form): value of that estimator, gradient of k2:
``k2 - sg[k2] + sg[value]``.

``clamp=c`` clamps the value to [-c, c] (verl's low_var_kl and OpenRLHF use c = 10). For k3
the exponent is also clamped, to [-(c + 1), log(2c + 2)]: outside that interval k3 > c, so
the value is c and the gradient 0 either way, but exp can no longer overflow into an inf
that would turn the zero gradient into NaN. (verl clamps the exponent to [-20, 20]; with
c = 10 both give identical values and gradients.) The "+" gradient is never clamped.

Inputs of any float dtype; computed and returned in float64 for float64 ``logprobs``, else
float32. Differentiable in both arguments.
"""
from __future__ import annotations

import math

import torch

from ._dtypes import acc_dtype

__all__ = ["KL_ESTIMATORS_REF", "kl_penalty_ref"]

KL_ESTIMATORS_REF = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")


def _kl_value(d: torch.Tensor, base: str, clamp: float | None) -> torch.Tensor:
    if base == "k1":
        value = d
    elif base == "k2":
        value = 0.5 * d.square()
    elif base == "abs":
        value = d.abs()
    elif base == "k3":
        neg = -d  # log(pi_ref / pi_theta)
        if clamp is not None:
            neg = neg.clamp(min=-(clamp + 1.0), max=math.log(2.0 * clamp + 2.0))
        value = torch.exp(neg) - neg - 1.0
    else:
        raise ValueError(f"unknown KL estimator {base!r}; expected one of {', '.join(KL_ESTIMATORS_REF)}")
    if clamp is not None:
        value = value.clamp(min=-clamp, max=clamp)
    return value


def kl_penalty_ref(
    logprobs: torch.Tensor,  # [...] log pi_theta(y_t)
    ref_logprobs: torch.Tensor,  # [...] log pi_ref(y_t), same shape
    estimator: str = "k3",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL estimate shaped like ``logprobs`` (fp32, fp64 for fp64 input)."""
    if estimator not in KL_ESTIMATORS_REF:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS_REF)}")
    acc = acc_dtype(logprobs.dtype)
    d = logprobs.to(acc) - ref_logprobs.to(acc)
    straight_through = estimator.endswith("+")
    base = estimator.rstrip("+")
    value = _kl_value(d, base, None if clamp is None else float(clamp))
    if not straight_through:
        return value
    k2 = 0.5 * d.square()
    return k2 - k2.detach() + value.detach()
