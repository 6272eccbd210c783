"""PPO/GRPO-family policy loss on per-token log-probs (public function).

``policy_loss_from_logprobs`` validates its inputs (clear ValueErrors) and evaluates the
PyTorch reference: on ``[B, T]`` log-probs the loss is a handful of elementwise ops, and the
expensive part (the vocabulary-sized log-softmax) is the job of the fused ``policy_loss``
from logits, which returns the same numbers. The shared checks here (``check_bt``,
``check_count``) are reused by that path and by ``fastpo.functional.advantages``.
"""
from __future__ import annotations

import math

import torch

from fastpo._validation import as_rows, check_logits_labels
from fastpo.functional.token_logprobs import token_logprobs
from fastpo.config import METRIC_KEYS, PolicyLossConfig, PolicyLossOutput
from fastpo.ops import registry
from fastpo.ops.policy_loss import PolicyExtras, PolicyLossFunction
from fastpo.ops.vocab_parallel import check_vocab_parallel, vocab_parallel_token_logprobs
from fastpo.reference.policy_loss import policy_loss_ref

__all__ = ["policy_loss_from_logprobs", "policy_loss"]

_DEFAULT_CONFIG = PolicyLossConfig()


def check_bt(name: str, x, shape: tuple | None, *, mask: bool = False) -> torch.Tensor:
    """``x`` must be a 2-D ``[B, T]`` tensor (of ``shape`` if given); float, or bool/int for masks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not (x.dtype.is_floating_point or mask):
        kinds = "bool, integer or floating-point" if mask else "floating-point"
        raise ValueError(f"{name} must be a {kinds} tensor, got {x.dtype}")
    if shape is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T], got {tuple(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    elif tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (like logprobs), got {list(x.shape)}")
    return x


def check_count(name: str, value) -> None:
    """A global normaliser: None, a number > 0, or a one-element tensor (not synced to check)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name} must be a number or a one-element real tensor, got {tuple(value.shape)} {value.dtype}"
            )
        return
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_policy_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, config) -> None:
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a fastpo.PolicyLossConfig, got {type(config).__name__}")
    check_bt("logprobs", logprobs, None)
    shape = tuple(logprobs.shape)
    check_bt("old_logprobs", old_logprobs, shape)
    check_bt("mask", mask, shape, mask=True)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.dtype.is_floating_point:
        raise ValueError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(
            f"advantages must have shape [B] = [{shape[0]}] or [B, T] = {list(shape)}, got {list(advantages.shape)}"
        )
    if ref_logprobs is not None:
        check_bt("ref_logprobs", ref_logprobs, shape)
    elif config.kl_coef != 0.0:
        raise ValueError(f"config.kl_coef = {config.kl_coef} needs ref_logprobs ([B, T] reference log-probs)")
    if entropy is not None:
        check_bt("entropy", entropy, shape)
    elif config.entropy_coef != 0.0:
        raise ValueError(f"config.entropy_coef = {config.entropy_coef} needs entropy ([B, T] per-token entropy)")
    for name, x in (
        ("old_logprobs", old_logprobs),
        ("advantages", advantages),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
    ):
        if x is not None and x.device != logprobs.device:
            raise ValueError(f"logprobs are on {logprobs.device} but {name} is on {x.device}")


def _check_call_extras(shape, device, config, policy_weights, rollout_logprobs, aux_num_tokens) -> None:
    """The call-time arguments of the parity features: shapes, dtypes, devices, consistency."""
    if policy_weights is not None:
        if not isinstance(policy_weights, torch.Tensor):
            raise TypeError(f"policy_weights must be a torch.Tensor, got {type(policy_weights).__name__}")
        if not policy_weights.dtype.is_floating_point:
            raise ValueError(f"policy_weights must be a floating-point tensor, got {policy_weights.dtype}")
        if tuple(policy_weights.shape) not in ((shape[0],), tuple(shape)):
            raise ValueError(
                f"policy_weights must have shape [B] = [{shape[0]}] or [B, T] = {list(shape)}, "
                f"got {list(policy_weights.shape)}"
            )
    if rollout_logprobs is not None:
        check_bt("rollout_logprobs", rollout_logprobs, tuple(shape))
    for name, x in (("policy_weights", policy_weights), ("rollout_logprobs", rollout_logprobs)):
        if x is not None and x.device != device:
            raise ValueError(f"logprobs are on {device} but {name} is on {x.device}")
    check_count("aux_num_tokens", aux_num_tokens)
    if aux_num_tokens is not None and config.kl_agg is None and config.entropy_agg is None:
        raise ValueError("aux_num_tokens is the token-mean normaliser of config.kl_agg / config.entropy_agg; "
                         "both are None, so it would be ignored")


def policy_loss_from_logprobs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    config: PolicyLossConfig = _DEFAULT_CONFIG,
    num_tokens=None,
    num_sequences=None,
    policy_weights: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    aux_num_tokens=None,
) -> PolicyLossOutput:
    """Clipped policy-gradient loss (PPO / GRPO / DAPO / Dr. GRPO / GSPO / CISPO) on log-probs.

    Args:
        logprobs:      ``[B, T]`` log pi_theta of the sampled tokens, any float dtype; the
                       gradient flows back in its dtype.
        old_logprobs:  ``[B, T]`` log-probs of the policy that sampled the tokens (no gradient
                       needed; for on-policy single-step updates pass ``logprobs.detach()``).
        advantages:    ``[B]`` (one per sequence, GRPO) or ``[B, T]`` (per token, e.g. GAE).
        mask:          ``[B, T]`` bool / integer / float; nonzero = token counts, 0 = ignored
                       (float masks are binarised, not used as weights).
        ref_logprobs:  ``[B, T]`` reference-policy log-probs; required when config.kl_coef != 0.
        entropy:       ``[B, T]`` per-token entropy (differentiable if you want the bonus's
                       gradient); required when config.entropy_coef != 0.
        config:        ``PolicyLossConfig`` (variant, clipping, KL, entropy, aggregation).
        num_tokens:    global token count for "token-mean" (default: local max(1, sum mask)).
        num_sequences: global sequence count S for the "seq-mean-*" modes (default: B).
        policy_weights: ``[B]`` or ``[B, T]`` weights (used detached) that multiply the policy
                       term only: the rollout importance-sampling correction
                       (``fastpo.rollout_is_weights``; TRL's importance_sampling_ratio, verl's
                       rollout_is_weights). vespo folds them into its sequence weight instead
                       (TRL); gmpo uses their per-sequence masked geometric mean (verl).
        rollout_logprobs: ``[B, T]`` log-probs of the inference engine that sampled the tokens;
                       used by config.off_policy_mask_threshold (default there: old_logprobs).
        aux_num_tokens: the "token-mean" normaliser of config.kl_agg / config.entropy_agg
                       (default: the local count of the tokens that term acts on).

    Per-token loss (r = exp(logp - old), A the advantage, lo/hi = 1 -/+ clip_low/clip_high):
        ppo    max(-A min(r, ratio_cap), -A clip(r, lo, hi)); dual-clip where A < 0: min(., -c A)
        gspo   the same with the sequence ratio exp(masked mean of logp - old), stop-gradient
               token form (GSPO, Zheng et al. 2025)
        cispo  -sg[clip(r, lo, hi)] A logp    (CISPO, MiniMax-M1 2025)
        sapo / pg / gmpo / vespo: see ``PolicyLossConfig``
        + kl_coef * KL_estimator(logp, ref)  - entropy_coef * H
    the policy term multiplied by the off-policy / top-entropy masks and policy_weights, the
    KL optionally by the ratio (kl_importance_weighted), aggregated by ``config.agg`` (formulas in ``PolicyLossConfig``). Papers: PPO (Schulman et
    al. 2017), GRPO (DeepSeekMath, Shao et al. 2024), DAPO (Yu et al. 2025), Dr. GRPO (Liu et
    al. 2025), k3 (Schulman, "Approximating KL divergence", 2020).

    Masked tokens get per-token loss exactly 0 and exactly zero gradient, whatever their inputs
    hold (inf/NaN included). A fully masked sequence contributes 0 and still counts in S; a
    fully masked batch gives loss 0. Set ``logratio_clamp`` and ``kl_clamp`` for finite results
    on extreme log-ratios.

    Returns:
        ``PolicyLossOutput(loss, per_token_loss, metrics)``: loss 0-dim and per_token_loss
        ``[B, T]`` in float32 (float64 for float64 logprobs); metrics a dict of detached 0-dim
        float32 masked token means ("clip_frac_low", "clip_frac_high", "dual_clip_frac",
        "ratio_mean", "approx_kl", "ref_kl", "entropy"; see ``PolicyLossOutput``).
    """
    if config is None:
        config = _DEFAULT_CONFIG
    _check_policy_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, config)
    check_count("num_tokens", num_tokens)
    check_count("num_sequences", num_sequences)
    _check_call_extras(logprobs.shape, logprobs.device, config, policy_weights, rollout_logprobs, aux_num_tokens)
    if entropy is None and config.top_entropy_quantile < 1.0:
        raise ValueError(f"config.top_entropy_quantile = {config.top_entropy_quantile} needs entropy "
                         "([B, T] per-token entropy)")
    loss, per_token_loss, metrics = policy_loss_ref(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        config=config,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        policy_weights=policy_weights,
        rollout_logprobs=rollout_logprobs,
        aux_num_tokens=aux_num_tokens,
    )
    return PolicyLossOutput(loss, per_token_loss, metrics)


def policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    config: PolicyLossConfig = _DEFAULT_CONFIG,
    num_tokens=None,
    num_sequences=None,
    policy_weights: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    aux_num_tokens=None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group=None,
    backend: str = "auto",
) -> PolicyLossOutput:
    """PPO-family policy loss fused from logits ``[B, T, V]`` (DESIGN.md §4, Level 2).

    Same numbers as ``policy_loss_from_logprobs(token_logprobs(logits, labels,
    temperature=config.temperature, return_entropy=True), old_logprobs, advantages,
    mask, ...)`` without materialising anything vocabulary-sized but the gradient:
    the forward computes dL/dlogits, and the backward only scales it by the upstream scalar.
    triton / cpu / cuda, token-local variants and features (ppo, cispo, sapo, pg; KL x ratio,
    policy_weights, kl_agg / entropy_agg): one kernel per token computes the log-prob, ratio,
    policy term, KL and entropy terms and writes the gradient. Sequence-level features (gspo
    and its options, gmpo, vespo, off_policy_mask_threshold, top_entropy_quantile < 1) and the
    torch backend: the token forward kernel, the [B, T] reference loss and its derivatives
    (``torch.func.grad``), the token backward kernel. Same traffic either way, no N x V
    intermediate.

    Args:
        logits: ``[B, T, V]`` fp32 / bf16 / fp16 (float64 for gradchecks).
        labels: ``[B, T]`` integer; ``ignore_index`` positions are masked out.
        old_logprobs: ``[B, T]`` log-probs of the behaviour policy (no gradient).
        advantages: ``[B]`` or ``[B, T]`` (no gradient).
        mask: ``[B, T]`` bool / 0-1; default ``labels != ignore_index``. The effective
            mask is ``mask & (labels != ignore_index)``.
        ref_logprobs: ``[B, T]`` reference-policy log-probs, required when
            ``config.kl_coef != 0`` (no gradient).
        config: :class:`fastpo.PolicyLossConfig` (variant, clipping, KL, entropy, agg).
        num_tokens, num_sequences: global normalisers (gradient accumulation / DP).
        policy_weights, rollout_logprobs, aux_num_tokens: as in ``policy_loss_from_logprobs``.
        inplace_backward: write the gradient over the logits buffer during the
            forward (no second N x V allocation); the logits are garbage afterwards.
        process_group: vocabulary parallel (DESIGN.md section 4): ``logits`` is this rank's
            shard ``[B, T, V_r]``, ``labels`` global ids; runs the sharded
            ``token_logprobs(..., return_entropy=True, process_group=...)`` then
            ``policy_loss_from_logprobs`` (same numbers, identical on every rank, each rank gets
            its gradient slice; with ``inplace_backward`` the gradient is written in the
            backward instead of the forward).

    Returns:
        :class:`fastpo.PolicyLossOutput`: ``loss`` (0-dim fp32, differentiable in
        logits), ``per_token_loss`` ``[B, T]`` (detached on this path) and ``metrics``.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a fastpo.PolicyLossConfig, got {type(config).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {getattr(logits, 'shape', None)}")
    check_logits_labels(logits, labels, ignore_index)
    shape = tuple(labels.shape)
    valid = labels != ignore_index
    if mask is None:
        mask = valid
    else:
        check_bt("mask", mask, shape, mask=True)
        mask = (mask if mask.dtype == torch.bool else mask != 0) & valid
    placeholder = torch.zeros(shape, device=logits.device)  # logp / entropy come from the logits
    _check_policy_inputs(placeholder, old_logprobs, advantages, mask, ref_logprobs, placeholder, config)
    check_count("num_tokens", num_tokens)
    check_count("num_sequences", num_sequences)
    _check_call_extras(shape, logits.device, config, policy_weights, rollout_logprobs, aux_num_tokens)
    # a one-element count tensor acts as a scalar: the loss stays 0-dim
    num_tokens, num_sequences = (
        c.reshape(()) if isinstance(c, torch.Tensor) else c for c in (num_tokens, num_sequences)
    )
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    if process_group is not None:
        check_vocab_parallel(process_group, backend)
        logp, entropy = vocab_parallel_token_logprobs(
            logits, labels.masked_fill(~mask, ignore_index), temperature=config.temperature,
            ignore_index=int(ignore_index), group=process_group, inplace_backward=bool(inplace_backward),
        )
        out = policy_loss_from_logprobs(
            logp, old_logprobs.detach(), advantages.detach(), mask, ref_logprobs=detach(ref_logprobs),
            entropy=entropy, config=config, num_tokens=num_tokens, num_sequences=num_sequences,
            policy_weights=detach(policy_weights), rollout_logprobs=detach(rollout_logprobs),
            aux_num_tokens=aux_num_tokens,
        )
        return PolicyLossOutput(out.loss, out.per_token_loss.detach(), out.metrics)
    name = registry.resolve("token_logprobs", backend, logits.device)
    rows, flat_labels = as_rows(logits, labels)
    flat_labels = torch.where(mask.reshape(-1), flat_labels, torch.full_like(flat_labels, ignore_index))
    loss, per_token, stacked = PolicyLossFunction.apply(
        rows, flat_labels, old_logprobs.detach(), advantages.detach(),
        None if ref_logprobs is None else ref_logprobs.detach(), mask, config, name, int(ignore_index),
        num_tokens, num_sequences, bool(inplace_backward), METRIC_KEYS,
        PolicyExtras(detach(policy_weights), detach(rollout_logprobs), aux_num_tokens),
    )
    return PolicyLossOutput(loss, per_token, dict(zip(METRIC_KEYS, stacked.unbind(0))))


def detach(t):
    return None if t is None else t.detach()


