"""Kernel-ready options of the fused policy loss, shared by every backend's launcher.

Triton-free on purpose (``fastpo.kernels.policy_loss`` imports triton): the CPU and CUDA
launchers (``fastpo.kernels.cpp``) and the op (``fastpo.ops.policy_loss``) use it without
importing triton. The codes must match csrc/policy_math.h (PolicyVariant, KlKind).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PolicyKernelArgs", "KL_KINDS", "VARIANT_CODES", "INF"]

VARIANT_CODES = {"ppo": 0, "cispo": 2, "sapo": 3, "pg": 4}
KL_KINDS = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}
INF = float("inf")


@dataclass(frozen=True)
class PolicyKernelArgs:
    """Kernel-ready options: disabled limits are +inf (runtime values, no recompiles)."""

    variant: int
    clip_low: float
    clip_high: float
    ratio_cap: float
    dual_clip: float  # inf when off (HAS_DUAL False)
    logratio_clamp: float
    kl_kind: int  # 0 when no KL term
    kl_straight: bool
    kl_clamp: float
    kl_coef: float
    entropy_coef: float
    temperature: float
    ignore_index: int
    sapo_tau_pos: float = 1.0  # sapo: tau where A > 0
    sapo_tau_neg: float = 1.05  # sapo: tau where A <= 0
    kl_weighted: bool = False  # KL term times the ratio r (kl_importance_weighted)

    @classmethod
    def from_config(cls, config, *, has_ref: bool, ignore_index: int) -> "PolicyKernelArgs":
        def inf_if_none(x):
            return INF if x is None else float(x)

        use_kl = has_ref and float(config.kl_coef) != 0.0
        return cls(
            variant=VARIANT_CODES[config.variant],
            clip_low=float(config.clip_low), clip_high=float(config.clip_high),
            ratio_cap=inf_if_none(config.ratio_cap), dual_clip=inf_if_none(config.dual_clip),
            logratio_clamp=inf_if_none(config.logratio_clamp),
            kl_kind=KL_KINDS[config.kl_estimator.rstrip("+")] if use_kl else 0,
            kl_straight=config.kl_estimator.endswith("+"), kl_clamp=inf_if_none(config.kl_clamp),
            kl_coef=float(config.kl_coef), entropy_coef=float(config.entropy_coef),
            temperature=float(config.temperature), ignore_index=int(ignore_index),
            sapo_tau_pos=float(getattr(config, "sapo_tau_pos", 1.0)),
            sapo_tau_neg=float(getattr(config, "sapo_tau_neg", 1.05)),
            kl_weighted=bool(getattr(config, "kl_importance_weighted", False)) and use_kl,
        )
