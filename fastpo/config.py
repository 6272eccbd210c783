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
    "SEQ_RATIOS",
    "SEQ_RATIO_GRADS",
    "VARIANTS",
]

VARIANTS = ("ppo", "gspo", "cispo", "sapo", "pg", "gmpo", "vespo")
SEQ_RATIOS = ("mean", "sum")
SEQ_RATIO_GRADS = ("token", "sequence")
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


def _finite(name: str, value) -> float:
    v = _real(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


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
                    "cispo" -sg[clip(r, 1-clip_low, 1+clip_high)] * A * logp (CISPO, MiniMax-M1 2025);
                    "sapo"  -A * (4/tau) * sigmoid(tau * (r - 1)), tau = sapo_tau_pos where A > 0 else
                            sapo_tau_neg (SAPO, Gao et al. 2025, arXiv:2511.20347);
                    "pg"    -A * logp (plain policy gradient; verl's "gpg", GPG 2025);
                    "gmpo"  geometric-mean PO: c_t = clamp(log r_t, log(1-clip_low), log(1+clip_high))
                            taken sign-aware (min where A_t > 0, max where A_t < 0, 0 where A_t = 0),
                            R_i = exp(sum_t m c / n_i), every token of sequence i carries -Abar_i * R_i
                            with Abar_i the masked mean advantage, full gradient (GMPO, Zhao et al.
                            2025, arXiv:2507.20673; verl's "geo_mean");
                    "vespo" -sg[phi_i] * A * logp, log w_i = clamp(sum_t m clamp(logp - old, +-20)
                            [+ sum_t m clamp(log policy_weights, log 1e-8, 20)], log 1e-8, 20),
                            phi = exp(lam + k log w - lam w) (0 where not finite), (k, lam) =
                            (vespo_k_pos, vespo_lambda_pos) where A >= 0 else the _neg pair, lam >= 1e-4
                            (VESPO, arXiv:2602.10693; TRL's get_gamma_weights).
    clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high] (>= 0; DAPO's clip-higher
                    when clip_high > clip_low). ``float("inf")`` disables a side.
    dual_clip:      c > 1: where A < 0 the per-token loss is capped at -c * A (Ye et al. 2020);
                    None disables. ppo and gspo only.
    ratio_cap:      TRL's ``delta`` (INTELLECT-2): the unclipped ratio term uses min(r, delta).
                    ppo and gspo only.
    seq_ratio:      gspo: "mean" log s_i = sum_t m (logp - old) / max(1, n_i) (GSPO) or "sum"
                    log s_i = sum_t m (logp - old) (the sequence likelihood ratio of TRL's RLOO;
                    needs seq_ratio_grad="sequence").
    seq_ratio_grad: gspo: "token" s_it = sg[s_i] * exp(logp - sg[logp]) (verl; GSPO's token form)
                    or "sequence" s_i differentiable through every token of the sequence (TRL,
                    OpenRLHF). Same values; gradients differ when A or weights vary within a row.
    seq_logratio_max: gspo: log s_i is clamped to at most this (verl's gspo uses 10); None off.
    logratio_clamp: clamp logp - old to [-c, c] before exp (verl uses 20); None disables.
                    Set it (and ``kl_clamp``) for inf/NaN-free results on extreme log-ratios.
    kl_coef:        weight of the KL-to-reference penalty added per token (>= 0; needs ref_logprobs).
    kl_estimator:   "k1" | "k2" | "k3" | "abs" and their "+" forms (see ``fastpo.kl_penalty``).
    kl_clamp:       clamp the KL estimate's value to [-c, c] (verl's low_var_kl and OpenRLHF use 10).
    kl_importance_weighted: KL term = kl_coef * KL_t * rho_t, rho the (differentiable) ratio of the
                    policy term before ratio_cap and clipping: r_t, or s_i for gspo (TRL 1.16's
                    use_bias_correction_kl, DeepSeek-V3.2).
    off_policy_mask_threshold: delta: the policy term is multiplied by 1[A >= 0 or D_i <= delta],
                    D_i = sum_t m (rollout_t - sg[logp_t]) / max(1, n_i) with NaN differences
                    counted as 0; rollout = the call's rollout_logprobs, else old_logprobs
                    (DeepSeek-V3.2 eq. 9; TRL's off_policy_mask_threshold). None disables.
    top_entropy_quantile: q in [0, 1]: the policy term and the entropy bonus act only on tokens
                    with H_t >= quantile_{1-q} of the kept tokens' entropies (torch.quantile,
                    linear; "Beyond the 80/20 rule", Wang et al. 2025; TRL). 1 keeps all.
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
    kl_agg, entropy_agg: None: the KL / entropy terms are added per token and aggregated with
                    ``agg`` (one aggregation). A mode name: loss = agg(policy) + kl_coef *
                    kl_agg(KL) - entropy_coef * entropy_agg(H), each with the same num_sequences
                    and agg_scale, their "token-mean" normaliser being the call-time
                    ``aux_num_tokens`` (default: the local count of the tokens the term acts on).
    sapo_tau_pos, sapo_tau_neg: SAPO gate temperatures (> 0; TRL / verl defaults 1.0, 1.05).
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma-weight shape
                    (TRL defaults 2, 3, 3, 2; lambda is clamped to >= 1e-4 as in TRL).
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
    seq_ratio: str = "mean"
    seq_ratio_grad: str = "token"
    seq_logratio_max: Optional[float] = None
    kl_importance_weighted: bool = False
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    kl_agg: Optional[str] = None
    entropy_agg: Optional[str] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

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
        if self.variant not in ("ppo", "gspo") and (self.dual_clip is not None or self.ratio_cap is not None):
            raise ValueError(f"dual_clip and ratio_cap apply to the ppo and gspo variants only, not {self.variant}")
        self._validate_parity_fields()

    def _validate_parity_fields(self) -> None:
        if self.seq_ratio not in SEQ_RATIOS:
            raise ValueError(f"unknown seq_ratio {self.seq_ratio!r}; expected one of {', '.join(SEQ_RATIOS)}")
        if self.seq_ratio_grad not in SEQ_RATIO_GRADS:
            raise ValueError(
                f"unknown seq_ratio_grad {self.seq_ratio_grad!r}; expected one of {', '.join(SEQ_RATIO_GRADS)}"
            )
        gspo_only = self.seq_ratio != "mean" or self.seq_ratio_grad != "token" or self.seq_logratio_max is not None
        if gspo_only and self.variant != "gspo":
            raise ValueError(
                f"seq_ratio, seq_ratio_grad and seq_logratio_max apply to the gspo variant only, not {self.variant}"
            )
        if self.seq_ratio == "sum" and self.seq_ratio_grad != "sequence":
            raise ValueError('seq_ratio="sum" (the sequence likelihood ratio) needs seq_ratio_grad="sequence"')
        if self.seq_logratio_max is not None:
            _finite("seq_logratio_max", self.seq_logratio_max)
        if not isinstance(self.kl_importance_weighted, bool):
            raise ValueError(f"kl_importance_weighted must be a bool, got {self.kl_importance_weighted!r}")
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        q = _real("top_entropy_quantile", self.top_entropy_quantile)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile!r}")
        for name in ("kl_agg", "entropy_agg"):
            value = getattr(self, name)
            if value is not None and value not in AGG_MODES:
                raise ValueError(f"unknown {name} {value!r}; expected None or one of {', '.join(AGG_MODES)}")
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            if not _finite(name, getattr(self, name)) > 0.0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _finite(name, getattr(self, name))


class PolicyLossOutput(NamedTuple):
    """Result of ``policy_loss_from_logprobs`` / ``policy_loss``.

    loss:           0-dim, fp32 (fp64 for fp64 log-probs), differentiable.
    per_token_loss: ``[B, T]``, same dtype, before aggregation: policy term + kl_coef * KL -
                    entropy_coef * H per token (also when kl_agg / entropy_agg aggregate those
                    terms separately); exactly 0 where mask is 0.
    metrics:        dict of detached 0-dim fp32 tensors, each a masked token mean over the
                    local batch (sum m x / max(1, sum m); the num_tokens override does not apply):
        "clip_frac_low"   tokens where the lower clip is active in the loss: ppo/gspo
                          A < 0 and r < 1 - clip_low; cispo r < 1 - clip_low (weight truncated);
                          gmpo A < 0 and log r < log(1 - clip_low); 0 for sapo / pg / vespo.
        "clip_frac_high"  ppo/gspo A > 0 and r > 1 + clip_high; cispo r > 1 + clip_high;
                          gmpo A > 0 and log r > log(1 + clip_high); 0 for sapo / pg / vespo.
        "dual_clip_frac"  A < 0 and the dual-clip bound -c*A is below the clipped loss (0 if off).
        "ratio_mean"      mean importance ratio of the policy term, per token: r (ppo, cispo,
                          sapo, pg), the sequence ratio s_i (gspo), R_i (gmpo), w_i (vespo);
                          after logratio_clamp, before clipping and ratio_cap.
        "approx_kl"       KL(old || new) by Schulman's k3 estimator: mean(r - 1 - log r) of the
                          per-token ratio. (verl and OpenRLHF log ppo_kl = mean(old - new), k1.)
        "ref_kl"          mean KL-to-reference estimate (the configured estimator's clamped
                          value); 0 when no ref_logprobs are given.
        "entropy"         mean of the given per-token entropy; 0 when none is given.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
