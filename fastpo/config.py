"""Options and result types of the PPO/GRPO policy-loss family.

``PolicyLossConfig`` carries every non-tensor option of ``policy_loss_from_logprobs``
and (later) the fused ``policy_loss`` (DESIGN section 4); ``PolicyLossOutput`` is what
both return. Formulas live in ``fastpo/reference/policy_loss.py``; presets that
reproduce TRL, verl and OpenRLHF live in ``fastpo/presets.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "METRIC_KEYS",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "VARIANTS",
]

VARIANTS = ("ppo", "gspo", "cispo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Suffix "+": forward value of that estimator, gradient of k2 (straight-through, as verl's "k3+").
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")
METRIC_KEYS = (
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "ratio_mean",
    "approx_kl",
    "ref_kl",
    "entropy",
)


def _real(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(out):
        raise ValueError(f"{name} must not be NaN")
    return out


def _optional_positive(name: str, value, *, above: float = 0.0) -> None:
    if value is None:
        return
    v = _real(name, value)
    if not v > above:
        raise ValueError(f"{name} must be None or a number > {above:g}, got {value!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of the clipped policy-gradient loss (frozen; validated on creation).

    variant:        "ppo"   per-token ratio r = exp(logp - old) in the clipped surrogate
                            (PPO, Schulman et al. 2017; GRPO, DeepSeekMath 2024);
                    "gspo"  sequence ratio s_i = exp(masked mean_t (logp - old)), used in
                            its stop-gradient token form s_it = sg[s_i] * exp(logp - sg[logp])
                            (GSPO, Zheng et al. 2025);
                    "cispo" -sg[clip(r, 1-clip_low, 1+clip_high)] * A * logp (CISPO, MiniMax-M1 2025).
    clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high] (>= 0; DAPO's clip-higher
                    when clip_high > clip_low). ``float("inf")`` disables a side.
    dual_clip:      c > 1: where A < 0 the per-token loss is capped at -c * A (Ye et al. 2020);
                    None disables. ppo and gspo only.
    ratio_cap:      TRL's ``delta`` (INTELLECT-2): the unclipped ratio term uses min(r, delta).
                    ppo and gspo only.
    logratio_clamp: clamp logp - old to [-c, c] before exp (verl uses 20); None disables.
                    Set it (and ``kl_clamp``) for inf/NaN-free results on extreme log-ratios.
    kl_coef:        weight of the KL-to-reference penalty added per token (>= 0; needs ref_logprobs).
    kl_estimator:   "k1" | "k2" | "k3" | "abs" and their "+" forms (see ``fastpo.kl_penalty``).
    kl_clamp:       clamp the KL estimate's value to [-c, c] (verl's low_var_kl and OpenRLHF use 10).
    entropy_coef:   entropy bonus: the per-token loss gets ``- entropy_coef * H_t`` (needs entropy).
    temperature:    softmax temperature used by the from-logits path; the from-log-probs path
                    takes log-probs already computed at that temperature and ignores it.
    agg:            aggregation of the masked per-token loss L (m the mask, S = num_sequences
                    (default B), N = num_tokens (default max(1, sum m))):
                    "token-mean"              sum m L / N
                    "seq-mean-token-mean"     (1/S) sum_i (sum_t m L / max(1, sum_t m))
                    "seq-mean-token-sum"      (1/S) sum_i sum_t m L
                    "seq-mean-token-sum-norm" sum m L / (S * agg_scale)   (Dr. GRPO 2025)
    agg_scale:      constant of "seq-mean-token-sum-norm" (TRL's max_completion_length);
                    None means T, the padded length of the batch.
    """

    variant: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    ratio_cap: Optional[float] = None
    logratio_clamp: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = None
    entropy_coef: float = 0.0
    temperature: float = 1.0
    agg: str = "token-mean"
    agg_scale: Optional[float] = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.agg not in AGG_MODES:
            raise ValueError(f"unknown agg {self.agg!r}; expected one of {', '.join(AGG_MODES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"unknown kl_estimator {self.kl_estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}"
            )
        for name in ("clip_low", "clip_high"):
            if not _real(name, getattr(self, name)) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        _optional_positive("dual_clip", self.dual_clip, above=1.0)
        _optional_positive("ratio_cap", self.ratio_cap)
        _optional_positive("logratio_clamp", self.logratio_clamp)
        _optional_positive("kl_clamp", self.kl_clamp)
        _optional_positive("agg_scale", self.agg_scale)
        kl_coef = _real("kl_coef", self.kl_coef)
        if not (math.isfinite(kl_coef) and kl_coef >= 0.0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if not math.isfinite(_real("entropy_coef", self.entropy_coef)):
            raise ValueError(f"entropy_coef must be finite, got {self.entropy_coef!r}")
        temperature = _real("temperature", self.temperature)
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.variant == "cispo" and (self.dual_clip is not None or self.ratio_cap is not None):
            raise ValueError("dual_clip and ratio_cap apply to the ppo and gspo variants only, not cispo")


class PolicyLossOutput(NamedTuple):
    """Result of ``policy_loss_from_logprobs`` / ``policy_loss``.

    loss:           0-dim, fp32 (fp64 for fp64 log-probs), differentiable.
    per_token_loss: ``[B, T]``, same dtype, before aggregation; exactly 0 where mask is 0.
    metrics:        dict of detached 0-dim fp32 tensors, each a masked token mean over the
                    local batch (sum m x / max(1, sum m); the num_tokens override does not apply):
        "clip_frac_low"   tokens where the lower clip is active in the loss: ppo/gspo
                          A < 0 and r < 1 - clip_low; cispo r < 1 - clip_low (weight truncated).
        "clip_frac_high"  ppo/gspo A > 0 and r > 1 + clip_high; cispo r > 1 + clip_high.
        "dual_clip_frac"  A < 0 and the dual-clip bound -c*A is below the clipped loss (0 if off).
        "ratio_mean"      mean importance ratio r (gspo: the sequence ratio, per token), after
                          logratio_clamp, before clipping and ratio_cap.
        "approx_kl"       KL(old || new) by Schulman's k3 estimator: mean(r - 1 - log r) of the
                          per-token ratio. (verl and OpenRLHF log ppo_kl = mean(old - new), k1.)
        "ref_kl"          mean KL-to-reference estimate (the configured estimator's clamped
                          value); 0 when no ref_logprobs are given.
        "entropy"         mean of the given per-token entropy; 0 when none is given.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
