"""``PolicyLossConfig`` presets that reproduce the policy loss of TRL, verl and OpenRLHF.

Each function takes that library's own option names and defaults and returns a config;
its docstring shows the call (and the call-time ``num_tokens`` / ``num_sequences``, when the
library normalises by a count known only at step time) that gives the same loss and
gradients as the library. ``tests/test_presets.py`` re-derives each library's formula and
checks values and gradients.
"""
from __future__ import annotations

import math

from fastpo.config import PolicyLossConfig

__all__ = ["openrlhf", "trl_grpo", "trl_rloo", "verl"]

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_TRL_AGG = {  # loss_type -> fastpo agg (dr_grpo adds agg_scale=max_completion_length)
    "grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean", "cispo": "token-mean",
    "vespo": "token-mean", "luspo": "seq-mean-token-sum",
}


def trl_grpo(
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = 512,
    use_bias_correction_kl: bool = True,
    entropy_coef: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
) -> PolicyLossConfig:
    """TRL ``GRPOTrainer`` loss (``_compute_loss``, TRL 1.16) for the given ``GRPOConfig`` values.

    Defaults are GRPOConfig's; with them the preset reproduces ``_compute_loss`` exactly (values
    and gradients). Per token, with r = exp(logp - old): ``-min(min(r, delta) A, clip(r,
    1 - epsilon, 1 + epsilon_high) A)`` (grpo, bnpo, dr_grpo, dapo, luspo); ``cispo``
    ``-sg[min(r, epsilon_high)] A logp`` (epsilon_high is an absolute cap there, recommended 5.0;
    TRL ignores delta for cispo, sapo and vespo); ``sapo`` the soft gate with
    sapo_temperature_pos/neg; ``vespo`` the Gamma-weighted ``-sg[phi] A logp``. Then the
    off-policy mask, the top-entropy mask, the vLLM IS ratio (``policy_weights``), and
    ``beta * k3`` (k3 unclamped), times the ratio when ``use_bias_correction_kl`` (TRL's default;
    ``kl_importance_weighted``). ``importance_sampling_level="sequence"`` maps to gspo with
    ``seq_ratio_grad="sequence"`` (TRL's (B, 1) weights are differentiable through every token).
    The entropy bonus is always a token mean over the tokens it acts on (``entropy_agg``).
    With G = gradient_accumulation_steps (``trainer.current_gradient_accumulation_steps``):

    ============  ==========================  =================================================
    loss_type     fastpo agg                  call-time arguments that reproduce TRL (training)
    ============  ==========================  =================================================
    grpo, sapo    seq-mean-token-mean         num_sequences = B * G
    bnpo          token-mean                  num_tokens = max(1, mask.sum()) * G
    dr_grpo       seq-mean-token-sum-norm,    num_sequences = B * G
                  agg_scale=max_completion_length
    luspo         seq-mean-token-sum          num_sequences = B * G
    dapo, cispo,  token-mean                  num_tokens = max(1, inputs["num_items_in_batch"])
    vespo                                     / num_processes * G / steps_per_generation
    entropy_coef  entropy_agg="token-mean"    aux_num_tokens = max(1, effective tokens) * G
    ============  ==========================  =================================================

    (G = 1, or evaluation: drop the G factors; steps_per_generation defaults to G, so for dapo
    num_tokens = num_items_in_batch / num_processes. "effective tokens": the mask, times the
    top-entropy mask when top_entropy_quantile < 1; with G = 1 the default is exactly that.)
    Inputs: vLLM importance sampling (``use_vllm`` and ``vllm_importance_sampling_correction``)
    -> ``policy_weights=inputs["importance_sampling_ratio"]`` ((B, 1) ratios: pass
    ``.squeeze(1)``; or compute them with ``fastpo.rollout_is_weights(..., log_clamp=None)``;
    vespo folds them into its weight, as TRL); off_policy_mask_threshold ->
    ``rollout_logprobs=inputs["sampling_per_token_logps"]`` when present.

    Example (DAPO)::

        cfg = fastpo.presets.trl_grpo(loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
        out = fastpo.policy_loss_from_logprobs(logps, old_logps, advantages, completion_mask, config=cfg,
                                               num_tokens=num_items_in_batch / world_size)

    Raises for what ``PolicyLossConfig`` cannot express: cispo or sapo with
    importance_sampling_level="sequence", vespo with importance_sampling_level="sequence" and a
    bias-corrected KL (beta != 0). Not covered: the adaptive entropy controller (pass the
    current coefficient each step: ``dataclasses.replace(cfg, entropy_coef=...)``), the
    cross-process quantile of top_entropy_quantile (fastpo takes it over the local batch; equal
    for one process).
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"unsupported TRL loss_type {loss_type!r}; expected one of {', '.join(TRL_LOSS_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; expected 'token' or 'sequence'"
        )
    sequence = importance_sampling_level == "sequence"
    if sequence and loss_type in ("cispo", "sapo"):
        raise ValueError(f"trl_grpo: {loss_type} with importance_sampling_level='sequence' is not supported")
    weighted = beta != 0.0 and bool(use_bias_correction_kl)
    if sequence and loss_type == "vespo" and weighted:
        raise ValueError("trl_grpo: vespo with importance_sampling_level='sequence' weights the KL by the "
                         "sequence ratio, which PolicyLossConfig does not express for vespo")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    agg, agg_scale = _TRL_AGG[loss_type], None
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' normalises by max_completion_length; it must be set")
        agg_scale = float(max_completion_length)
    common = dict(
        kl_coef=beta, kl_estimator="k3", kl_clamp=None, kl_importance_weighted=weighted,
        entropy_coef=entropy_coef, entropy_agg="token-mean" if entropy_coef != 0.0 else None,
        agg=agg, agg_scale=agg_scale, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold,
    )
    if loss_type == "cispo":
        if eps_high < 1.0:
            raise ValueError(
                f"for cispo TRL caps the ratio at epsilon_high itself (got {eps_high}); fastpo needs "
                "epsilon_high >= 1 (TRL recommends 5.0)"
            )
        # r >= 0 always, so clip_low=1 (lower bound 0) leaves TRL's one-sided cap.
        return PolicyLossConfig(variant="cispo", clip_low=1.0, clip_high=eps_high - 1.0, **common)
    if loss_type == "sapo":
        return PolicyLossConfig(variant="sapo", sapo_tau_pos=sapo_temperature_pos,
                                sapo_tau_neg=sapo_temperature_neg, **common)
    if loss_type == "vespo":
        return PolicyLossConfig(variant="vespo", vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                                vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, **common)
    seq = dict(variant="gspo", seq_ratio_grad="sequence") if sequence else dict(variant="ppo")
    return PolicyLossConfig(clip_low=epsilon, clip_high=eps_high, ratio_cap=delta, **seq, **common)


def trl_rloo(*, epsilon: float = 0.2, epsilon_high: float | None = None) -> PolicyLossConfig:
    """TRL ``RLOOTrainer`` loss (``_compute_loss``, TRL 1.16): one sequence-level clipped ratio
    ``s_i = exp(sum_t m (logp - old))`` per completion, ``-min(s_i A_i, clip(s_i, 1 - epsilon,
    1 + epsilon_high) A_i)``, mean over the B completions (TRL's HF Trainer then divides by the
    gradient-accumulation steps, outside the loss). Pass per-token ``old_logprobs`` (TRL stores
    their masked sum) and ``[B]`` advantages. RLOO's KL is part of the reward (beta: use
    ``fastpo.token_rewards`` / the sequence sum), not of this loss. Difference: a completion with
    no kept token contributes -A_i / B in TRL and 0 here (TRL's completions always hold EOS).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    return PolicyLossConfig(variant="gspo", seq_ratio="sum", seq_ratio_grad="sequence", clip_low=epsilon,
                            clip_high=eps_high, agg="seq-mean-token-mean")


# verl kl_loss_type -> (fastpo estimator, clamp). low_var_kl / k3 clamp their value to [-10, 10].
_VERL_KL = {
    "kl": ("k1", None),
    "k1": ("k1", None),
    "abs": ("abs", None),
    "mse": ("k2", None),
    "k2": ("k2", None),
    "low_var_kl": ("k3", 10.0),
    "k3": ("k3", 10.0),
}


VERL_LOSS_MODES = ("vanilla", "gspo", "sapo", "cispo", "gpg", "geo_mean")


def verl(
    *,
    loss_mode: str = "vanilla",
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    use_kl_loss: bool = False,
    kl_loss_coef: float = 0.001,
    kl_loss_type: str = "low_var_kl",
    entropy_coeff: float = 0.0,
    loss_scale_factor: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> PolicyLossConfig:
    """verl actor loss (``verl/trainer/ppo/core_algos.py`` policy losses + ``agg_loss`` +
    ``kl_penalty``, as combined by ``dp_actor`` / ``workers/utils/losses.py``; verl main, 2026).

    Option names are verl's ``actor_rollout_ref.actor.*`` (``loss_mode`` is
    ``policy_loss.loss_mode``). The KL term ``kl_loss_coef * agg(kl_penalty(logp, ref,
    kl_loss_type))`` (when ``use_kl_loss``) and the entropy term ``-entropy_coeff * agg(H)`` are
    always aggregated with ``loss_agg_mode``; the policy term per mode:

    ==========  =================================================================================
    loss_mode   fastpo
    ==========  =================================================================================
    vanilla     ppo, dual_clip=clip_ratio_c (always on), log-ratio clamp +-20, agg=loss_agg_mode
    gspo        gspo, token gradient form, log s_i clamped to <= 10 (seq_logratio_max), no dual
                clip, agg="seq-mean-token-mean" (forced by verl; KL / entropy: loss_agg_mode)
    sapo        sapo (tau_pos / tau_neg), log-ratio clamp +-20, agg="seq-mean-token-mean" (forced)
    cispo       cispo, clip [1 - low, 1 + high], log-ratio clamp +-20, agg=loss_agg_mode
    gpg         pg (-A logp), agg=loss_agg_mode
    geo_mean    gmpo with verl's log-space clip [-low, +high] (clip_low = 1 - e^-low, clip_high =
                e^high - 1), a plain mean over the B sequences ("seq-mean-token-mean", leave
                num_sequences at its default B); KL / entropy: loss_agg_mode
    ==========  =================================================================================

    kl_loss_type: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (value clamped to [-10, 10])
    and the "+" forms ("k1+", "k3+", "low_var_kl+", "abs+": k2 gradient). Rollout correction:
    ``policy_weights=rollout_is_weights`` (``fastpo.rollout_is_weights``, verl's TIS / MIS; geo_mean
    uses their masked geometric mean, as verl) and ``mask & fastpo.rollout_rejection_mask(...)``.

    Example::

        cfg = fastpo.presets.verl(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token-mean",
                                  use_kl_loss=True, kl_loss_coef=0.001, kl_loss_type="low_var_kl")
        out = fastpo.policy_loss_from_logprobs(log_prob, old_log_prob, advantages, response_mask,
                                               ref_logprobs=ref_log_prob, entropy=entropy, config=cfg)

    Call-time counts (verl's ``global_batch_info``):
    - "token-mean": ``num_tokens`` = global tokens / dp_size (and ``aux_num_tokens`` the same
      when KL / entropy are aggregated apart: gspo / sapo / geo_mean); default: local tokens.
    - "seq-mean-*": verl counts only non-empty sequences: ``num_sequences`` = (global non-empty
      sequences) / dp_size, locally the number of non-empty rows.
    - "seq-mean-token-sum-norm": verl main divides by ``loss_scale_factor`` (default T) only, not
      by a sequence count (the division by the batch size was reverted): pass
      ``num_sequences=1``.
    verl divides by ``mask.sum() + 1e-8`` (``seq_len + 1e-8`` per sequence); fastpo uses
    max(1, count): identical in fp32, 1e-8 relative in fp64. Raises for clip_cov, kl_cov,
    bypass_mode and other modes, and for gspo / sapo with "seq-mean-token-sum-norm" KL or entropy
    terms (one num_sequences cannot be both the sequence count and 1).
    """
    if loss_mode not in VERL_LOSS_MODES:
        raise ValueError(f"unsupported verl loss_mode {loss_mode!r}; expected one of {', '.join(VERL_LOSS_MODES)}")
    if loss_agg_mode not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"unsupported verl loss_agg_mode {loss_agg_mode!r}")
    base = kl_loss_type[:-1] if kl_loss_type.endswith("+") else kl_loss_type
    if base not in _VERL_KL:
        raise ValueError(f"unsupported verl kl_loss_type {kl_loss_type!r}; expected one of {', '.join(_VERL_KL)}")
    estimator, clamp = _VERL_KL[base]
    if kl_loss_type.endswith("+"):
        estimator += "+"
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    kl_coef = kl_loss_coef if use_kl_loss else 0.0
    common = dict(kl_coef=kl_coef, kl_estimator=estimator, kl_clamp=clamp, entropy_coef=entropy_coeff,
                  agg_scale=loss_scale_factor)
    forced = {"gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"}
    agg = forced.get(loss_mode, loss_agg_mode)
    if agg != loss_agg_mode:
        if loss_agg_mode == "seq-mean-token-sum-norm" and loss_mode != "geo_mean" and (kl_coef or entropy_coeff):
            raise ValueError(f"verl {loss_mode}: a seq-mean-token-sum-norm KL / entropy term next to the "
                             "forced seq-mean-token-mean policy term needs two sequence counts")
        common.update(kl_agg=loss_agg_mode if kl_coef else None, entropy_agg=loss_agg_mode if entropy_coeff else None)
    if loss_mode == "vanilla":
        return PolicyLossConfig(variant="ppo", clip_low=low, clip_high=high, dual_clip=clip_ratio_c,
                                logratio_clamp=20.0, agg=agg, **common)
    if loss_mode == "gspo":
        return PolicyLossConfig(variant="gspo", clip_low=low, clip_high=high, seq_logratio_max=10.0, agg=agg,
                                **common)
    if loss_mode == "sapo":
        return PolicyLossConfig(variant="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg, logratio_clamp=20.0,
                                agg=agg, **common)
    if loss_mode == "cispo":
        return PolicyLossConfig(variant="cispo", clip_low=low, clip_high=high, logratio_clamp=20.0, agg=agg,
                                **common)
    if loss_mode == "gpg":
        return PolicyLossConfig(variant="pg", agg=agg, **common)
    return PolicyLossConfig(variant="gmpo", clip_low=-math.expm1(-float(low)), clip_high=math.expm1(float(high)),
                            agg=agg, **common)


def openrlhf(
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    token_level_loss: bool = True,
    policy_loss_type: str = "ppo",
    use_kl_loss: bool = False,
    init_kl_coef: float = 0.01,
    kl_estimator: str = "k1",
    entropy_loss_coef: float | None = None,
) -> PolicyLossConfig:
    """OpenRLHF actor loss: ``PolicyLoss`` (openrlhf/models/loss.py) plus the actor's KL and
    entropy terms (``trainer/ray/ppo_actor.py``), for the given options (``eps_clip_low_high``,
    ``dual_clip``, ``policy_loss_type``, ``algo.kl.use_loss``, ``algo.kl.init_coef``,
    ``algo.kl.estimator``, ``actor.entropy_coef``).

    OpenRLHF: ppo ``-min(r A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) A)`` with log r
    clamped to [-20, 20] and dual-clip ``-max(min(.), dual_clip * A)`` where A < 0; "gspo" the
    sequence ratio exp(masked mean of logp - old), differentiable through every token
    (``seq_ratio_grad="sequence"``), per-sequence mean forced; ``token_level_loss=True``
    averages over all tokens ("token-mean"), False per sequence then over sequences
    ("seq-mean-token-mean"). With ``use_kl_loss`` the actor adds ``init_kl_coef *
    token_mean(compute_approx_kl(...))`` (k1/k2/k3, value clamped to [-10, 10]) and subtracts
    ``entropy_loss_coef * token_mean(entropy)``: always token means (``kl_agg`` / ``entropy_agg``
    "token-mean" when the policy term is per sequence); without it the KL is folded into the
    reward (``fastpo.token_rewards``) and is not part of this loss.

    Call-time counts (OpenRLHF's ``loss_batch_info``, summed over the optimizer step's
    micro-batches and the data-parallel ranks, divided by the accumulation steps gas):
    ``num_tokens = aux_num_tokens = batch_num_tokens / dp_size``, ``num_sequences =
    global_batch_size / dp_size`` (non-empty sequences only). Locally (one rank, gas = 1)
    ``num_sequences`` = the number of non-empty rows, and the token counts are the defaults.

    Example::

        cfg = fastpo.presets.openrlhf(clip_eps_low=0.2, clip_eps_high=0.28, use_kl_loss=True,
                                      init_kl_coef=1e-3, kl_estimator="k3")
        out = fastpo.policy_loss_from_logprobs(action_log_probs, old_action_log_probs, advantages,
                                               action_mask, ref_logprobs=base_action_log_probs, config=cfg)

    vLLM IS correction (``is_correction_enable``, ppo): ``policy_weights`` from
    ``fastpo.rollout_is_weights`` (tis / icepop / seq-mask-tis, see there); for gspo OpenRLHF
    takes the ratio against the rollout log-probs: pass ``old_logprobs=rollout_log_probs``.
    """
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"unsupported OpenRLHF policy_loss_type {policy_loss_type!r}; expected 'ppo' or 'gspo'")
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unsupported OpenRLHF kl_estimator {kl_estimator!r}; expected 'k1', 'k2' or 'k3'")
    gspo = policy_loss_type == "gspo"
    agg = "token-mean" if token_level_loss and not gspo else "seq-mean-token-mean"
    kl_coef = float(init_kl_coef) if use_kl_loss else 0.0
    entropy_coef = 0.0 if entropy_loss_coef is None else float(entropy_loss_coef)
    apart = agg != "token-mean"
    return PolicyLossConfig(
        variant=policy_loss_type,
        clip_low=clip_eps_low,
        clip_high=clip_eps_high,
        dual_clip=dual_clip,
        logratio_clamp=None if gspo else 20.0,
        seq_ratio_grad="sequence" if gspo else "token",
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=10.0,
        entropy_coef=entropy_coef,
        agg=agg,
        kl_agg="token-mean" if apart and kl_coef else None,
        entropy_agg="token-mean" if apart and entropy_coef else None,
    )
