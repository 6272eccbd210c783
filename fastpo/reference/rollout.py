"""Reference rollout-correction helpers: importance-sampling weights and rejection masks for
tokens sampled by an inference engine (vLLM / SGLang) whose log-probs differ from the trainer's.

Shapes ``[B, T]``; mask nonzero = count the token. No gradient; float32 (float64 for float64
``old_logprobs``); exactly 0 (False) at masked positions. With lr = old - rollout
(log pi_train / pi_rollout at the sampled token), n_i = sum_t m:

rollout_is_weights_ref (truncated / masked importance sampling; Yao et al. 2025 "Your efficient
RL framework secretly brings you off-policy RL training"; Liu et al. 2025 "When speed kills
stability"):
    log w  = lr (level "token"), sum_t m lr ("sequence"), sum_t m lr / max(1, n_i) ("geometric"),
             NaN log-ratios (tokens the engine could not score) counted as 0 (TRL),
             clamped to [-log_clamp, log_clamp] (verl's safety bound 20; None: no clamp, TRL)
    w      = exp(log w); "truncate": clamp(w, low, high); "mask": w * 1[low <= w <= high]
             (None bounds are open)
    batch_normalize: w / mean(w) where mean(w) > 1e-8 (token level: over the kept tokens;
             sequence / geometric: over the non-empty sequences), after truncation (verl)

rollout_rejection_mask_ref (verl's rollout rejection sampling, ``compute_rollout_rejection_mask``):
    lr clamped to [-20, 20]; k1 = -lr, k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr per token;
    criteria "token_kX" (per token), "seq_sum_kX", "seq_mean_kX" (masked sum / mean over the
    sequence, mean by max(1, n_i)), "seq_max_k2", "seq_max_k3" (masked max; 0 for an empty row);
    k1 criteria keep log(lower) <= stat <= log(upper), the others stat <= upper. A token is kept
    when every criterion passes. NaN statistics fail (the token, or its whole sequence).
"""
from __future__ import annotations

import math

import torch

from ._dtypes import acc_dtype, keep_mask

__all__ = ["REJECTION_CRITERIA", "rollout_is_weights_ref", "rollout_rejection_mask_ref"]

REJECTION_CRITERIA = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)
_SAFETY = 20.0


def _masked_log_ratio(old, rollout, keep, acc, nan_to_zero: bool):
    zero = torch.zeros((), dtype=acc, device=keep.device)
    lr = old.detach().to(acc) - rollout.detach().to(acc)
    if nan_to_zero:
        lr = torch.nan_to_num(lr, nan=0.0)
    return torch.where(keep, lr, zero), zero


@torch.no_grad()
def rollout_is_weights_ref(
    old_logprobs: torch.Tensor,  # [B, T] log pi_train (the trainer's recomputed old log-probs)
    rollout_logprobs: torch.Tensor,  # [B, T] log pi_rollout (the inference engine's)
    mask: torch.Tensor,  # [B, T]
    *,
    level: str = "token",
    mode: str = "truncate",
    low: float | None = None,
    high: float | None = 2.0,
    log_clamp: float | None = 20.0,
    batch_normalize: bool = False,
) -> torch.Tensor:
    """``[B, T]`` importance-sampling weights for ``policy_weights`` (module docstring)."""
    acc = acc_dtype(old_logprobs.dtype)
    keep = keep_mask(mask)
    lr, zero = _masked_log_ratio(old_logprobs, rollout_logprobs, keep, acc, nan_to_zero=True)
    counts = keep.sum(-1, keepdim=True).clamp(min=1).to(acc)
    if level == "token":
        log_w = lr
    elif level == "sequence":
        log_w = lr.sum(-1, keepdim=True).expand_as(lr)
    elif level == "geometric":
        log_w = (lr.sum(-1, keepdim=True) / counts).expand_as(lr)
    else:
        raise ValueError(f"unknown level {level!r}")
    if log_clamp is not None:
        log_w = log_w.clamp(-float(log_clamp), float(log_clamp))
    w = torch.exp(log_w)
    if mode == "truncate":
        if low is not None or high is not None:
            w = w.clamp(min=None if low is None else float(low), max=None if high is None else float(high))
    elif mode == "mask":
        inside = torch.ones_like(keep)
        if low is not None:
            inside = inside & (w >= float(low))
        if high is not None:
            inside = inside & (w <= float(high))
        w = torch.where(inside, w, zero)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    w = torch.where(keep, w, zero)
    if batch_normalize:
        if level == "token":
            mean = w.sum() / keep.sum().clamp(min=1).to(acc)
        else:
            seq_w = w.sum(-1) / counts.squeeze(-1)
            nonempty = keep.any(-1)
            mean = torch.where(nonempty, seq_w, zero).sum() / nonempty.sum().clamp(min=1).to(acc)
        w = torch.where(mean > 1e-8, w / mean, w)  # no host sync
    return w


def _parse_thresholds(criteria: list[str], thresholds) -> list[tuple[float | None, float]]:
    """verl's threshold spec: one shared or one per criterion; k1 criteria take (lower, upper)
    ratio bounds ("lower_upper" in a string) or a single upper (lower = 1 / upper)."""
    if isinstance(thresholds, str):
        specs = [part.strip() for part in thresholds.split(",") if part.strip()]
    elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        specs = [thresholds]
    elif isinstance(thresholds, (list, tuple)) and len(thresholds) == 2 and len(criteria) == 1 \
            and all(isinstance(x, (int, float)) for x in thresholds) and criteria[0].endswith("k1"):
        specs = [tuple(thresholds)]
    else:
        specs = list(thresholds)
    if len(specs) == 1:
        specs = specs * len(criteria)
    if len(specs) != len(criteria):
        raise ValueError(f"thresholds: expected one shared value or {len(criteria)} (one per criterion), "
                         f"got {len(specs)}")
    out = []
    for name, spec in zip(criteria, specs):
        if isinstance(spec, str) and "_" in spec:
            spec = tuple(float(x) for x in spec.split("_", 1))
        if isinstance(spec, tuple):
            if not name.endswith("k1"):
                raise ValueError(f"criterion {name!r} takes a single upper threshold, got {spec!r}")
            lower, upper = float(spec[0]), float(spec[1])
        else:
            upper = float(spec)
            lower = 1.0 / upper if name.endswith("k1") and upper > 0 else None
        if not (upper > 0 and math.isfinite(upper)) or (lower is not None and not (lower > 0 and math.isfinite(lower))):
            raise ValueError(f"thresholds for {name!r} must be finite and positive, got {spec!r}")
        out.append((lower, upper))
    return out


@torch.no_grad()
def rollout_rejection_mask_ref(
    old_logprobs: torch.Tensor,  # [B, T]
    rollout_logprobs: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    criteria,  # "token_k1,seq_mean_k3" or a list of names
    thresholds,  # number, verl string spec, or one value / (lower, upper) per criterion
) -> torch.Tensor:
    """bool ``[B, T]``: kept tokens (mask and every criterion passes). Module docstring."""
    names = [c.strip() for c in criteria.split(",") if c.strip()] if isinstance(criteria, str) else list(criteria)
    if not names:
        raise ValueError("criteria must name at least one rejection criterion")
    for name in names:
        if name not in REJECTION_CRITERIA:
            raise ValueError(f"unknown rejection criterion {name!r}; expected one of {', '.join(REJECTION_CRITERIA)}")
    bounds = _parse_thresholds(names, thresholds)
    acc = acc_dtype(old_logprobs.dtype)
    keep = keep_mask(mask)
    lr, zero = _masked_log_ratio(old_logprobs, rollout_logprobs, keep, acc, nan_to_zero=False)
    lr = lr.clamp(-_SAFETY, _SAFETY)
    stats = {"k1": -lr, "k2": 0.5 * lr.square(), "k3": torch.exp(lr) - 1.0 - lr}
    counts = keep.sum(-1).clamp(min=1).to(acc)
    passed = keep.clone()
    for name, (lower, upper) in zip(names, bounds):
        kind = name[-2:]
        stat = torch.where(keep, stats[kind], zero)
        if name.startswith("seq_sum"):
            stat = stat.sum(-1, keepdim=True)
        elif name.startswith("seq_mean"):
            stat = (stat.sum(-1) / counts).unsqueeze(-1)
        elif name.startswith("seq_max"):
            neg_inf = torch.full((), -math.inf, dtype=acc, device=keep.device)
            peak = torch.where(keep, stat, neg_inf).amax(-1, keepdim=True)
            stat = torch.where(keep.any(-1, keepdim=True), peak, zero)
        if kind == "k1":
            ok = (stat >= math.log(lower)) & (stat <= math.log(upper))
        else:
            ok = stat <= upper
        passed = passed & ok.expand_as(keep)
    return passed
