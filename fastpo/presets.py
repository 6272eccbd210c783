"""``PolicyLossConfig`` presets that reproduce the policy loss of TRL, verl and OpenRLHF.

Each function takes that library's own option names and defaults and returns a config;
its docstring shows the call (and the call-time ``num_tokens`` / ``num_sequences``, when the
library normalises by a count known only at step time) that gives the same loss and
gradients as the library. ``tests/test_presets.py`` re-derives each library's formula and
checks values and gradients.
"""
from __future__ import annotations

from fastpo.config import PolicyLossConfig

__all__ = ["openrlhf", "trl_grpo", "verl"]

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


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
) -> PolicyLossConfig:
    """TRL ``GRPOTrainer`` loss (``_compute_loss``, TRL 1.16) for the given ``GRPOConfig`` values.

    Defaults are GRPOConfig's. Per token, with r = exp(logp - old): ``-min(min(r, delta) A,
    clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta * k3`` (k3 unclamped);
    ``importance_sampling_level="sequence"`` replaces r by the GSPO sequence ratio (TRL's
    (B, 1) weights give the same values and, for per-sequence advantages, the same gradients
    as fastpo's stop-gradient token form); ``cispo``: ``-sg[min(r, epsilon_high)] A logp``
    (epsilon_high is an absolute ratio cap there, recommended 5.0; TRL ignores delta for cispo).
    With G = gradient_accumulation_steps (``trainer.current_gradient_accumulation_steps``):

    ============  ==========================  =================================================
    loss_type     fastpo agg                  call-time arguments that reproduce TRL (training)
    ============  ==========================  =================================================
    grpo          seq-mean-token-mean         num_sequences = B * G
    bnpo          token-mean                  num_tokens = max(1, mask.sum()) * G
    dr_grpo       seq-mean-token-sum-norm,    num_sequences = B * G
                  agg_scale=max_completion_length
    dapo, cispo   token-mean                  num_tokens = max(1, inputs["num_items_in_batch"])
                                              / num_processes * G / steps_per_generation
    ============  ==========================  =================================================

    (G = 1, or evaluation: drop the G factors; steps_per_generation defaults to G, so for dapo
    num_tokens = num_items_in_batch / num_processes, the global token count per process.)

    Example (DAPO)::

        cfg = fastpo.presets.trl_grpo(loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
        out = fastpo.policy_loss_from_logprobs(logps, old_logps, advantages, completion_mask, config=cfg,
                                               num_tokens=num_items_in_batch / world_size)

    Raises for what one ``PolicyLossConfig`` cannot express: ``beta != 0`` with
    ``use_bias_correction_kl=True`` (TRL 1.16's default multiplies the KL by the importance
    ratio: set it False in GRPOConfig and here), ``entropy_coef != 0`` unless loss_type is
    "bnpo" (TRL's entropy bonus is always a local token mean), loss types sapo / luspo / vespo,
    cispo with importance_sampling_level="sequence". Not covered: top_entropy_quantile < 1,
    off_policy_mask_threshold, the vLLM importance-sampling correction, the adaptive entropy
    controller.
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"unsupported TRL loss_type {loss_type!r}; expected one of {', '.join(TRL_LOSS_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; expected 'token' or 'sequence'"
        )
    if beta != 0.0 and use_bias_correction_kl:
        raise ValueError(
            "TRL's use_bias_correction_kl=True (its default) multiplies the KL term by the importance ratio, "
            "which PolicyLossConfig does not express; set use_bias_correction_kl=False (in GRPOConfig and here)"
        )
    if entropy_coef != 0.0 and loss_type != "bnpo":
        raise ValueError(
            "TRL normalises its entropy bonus by the local token count, which matches the policy term's "
            "aggregation only for loss_type='bnpo'"
        )
    eps_high = epsilon if epsilon_high is None else epsilon_high
    agg, agg_scale = "token-mean", None
    if loss_type == "grpo":
        agg = "seq-mean-token-mean"
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' normalises by max_completion_length; it must be set")
        agg, agg_scale = "seq-mean-token-sum-norm", float(max_completion_length)
    common = dict(
        kl_coef=beta, kl_estimator="k3", kl_clamp=None, entropy_coef=entropy_coef, agg=agg, agg_scale=agg_scale
    )
    if loss_type == "cispo":
        if importance_sampling_level != "token":
            raise ValueError("trl_grpo: cispo with importance_sampling_level='sequence' is not supported")
        if eps_high < 1.0:
            raise ValueError(
                f"for cispo TRL caps the ratio at epsilon_high itself (got {eps_high}); fastpo needs "
                "epsilon_high >= 1 (TRL recommends 5.0)"
            )
        # r >= 0 always, so clip_low=1 (lower bound 0) leaves TRL's one-sided cap.
        return PolicyLossConfig(variant="cispo", clip_low=1.0, clip_high=eps_high - 1.0, **common)
    variant = "gspo" if importance_sampling_level == "sequence" else "ppo"
    return PolicyLossConfig(variant=variant, clip_low=epsilon, clip_high=eps_high, ratio_cap=delta, **common)


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


def verl(
    *,
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
) -> PolicyLossConfig:
    """verl actor loss with ``policy_loss.loss_mode="vanilla"`` (``compute_policy_loss_vanilla``).

    Option names are verl's ``actor_rollout_ref.actor.*``. verl's vanilla loss always applies
    dual-clip with ``clip_ratio_c`` (default 3) where A < 0, clamps logp - old to [-20, 20]
    before exp, adds ``kl_loss_coef * agg(kl_penalty(logp, ref, kl_loss_type))`` when
    ``use_kl_loss`` and subtracts ``entropy_coeff * agg(entropy)``, all with the same
    ``loss_agg_mode``. kl_loss_type: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (value
    clamped to [-10, 10]) and the "+" forms ("k1+", "k3+", "low_var_kl+", "abs+": k2 gradient).

    Example::

        cfg = fastpo.presets.verl(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token-mean",
                                  use_kl_loss=True, kl_loss_coef=0.001, kl_loss_type="low_var_kl")
        out = fastpo.policy_loss_from_logprobs(log_prob, old_log_prob, advantages, response_mask,
                                               ref_logprobs=ref_log_prob, entropy=entropy, config=cfg)

    Version notes (the call-time arguments that reproduce each):
    - verl divides by ``mask.sum() + 1e-8`` (``seq_len + 1e-8`` per sequence); fastpo uses
      max(1, count): identical in fp32, 1e-8 relative in fp64.
    - Recent verl excludes fully masked sequences from the seq-mean count and normalises by
      global counts times the data-parallel size: pass ``num_sequences`` = (global batch size
      or number of non-empty sequences) / dp_size, ``num_tokens`` = global tokens / dp_size.
    - Older verl's "seq-mean-token-sum-norm" divided by T only, not by the number of
      sequences: pass ``num_sequences=1``.
    Other verl loss modes (gspo, gpg, clip_cov, kl_cov, geo_mean) are not covered.
    """
    if loss_agg_mode not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"unsupported verl loss_agg_mode {loss_agg_mode!r}")
    base = kl_loss_type[:-1] if kl_loss_type.endswith("+") else kl_loss_type
    if base not in _VERL_KL:
        raise ValueError(f"unsupported verl kl_loss_type {kl_loss_type!r}; expected one of {', '.join(_VERL_KL)}")
    estimator, clamp = _VERL_KL[base]
    if kl_loss_type.endswith("+"):
        estimator += "+"
    return PolicyLossConfig(
        variant="ppo",
        clip_low=clip_ratio if clip_ratio_low is None else clip_ratio_low,
        clip_high=clip_ratio if clip_ratio_high is None else clip_ratio_high,
        dual_clip=clip_ratio_c,
        logratio_clamp=20.0,
        kl_coef=kl_loss_coef if use_kl_loss else 0.0,
        kl_estimator=estimator,
        kl_clamp=clamp,
        entropy_coef=entropy_coeff,
        agg=loss_agg_mode,
        agg_scale=loss_scale_factor,
    )


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
    entropy terms, for the given CLI options (``--eps_clip_low_high``, ``--dual_clip``,
    ``--policy_loss_type``, ``--use_kl_loss``, ``--init_kl_coef``, ``--kl_estimator``,
    ``--entropy_loss_coef``).

    OpenRLHF: ``loss = -min(r A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) A)``, with
    dual-clip ``-max(min(.), dual_clip * A)`` where A < 0; "gspo" uses the sequence ratio
    and forces the per-sequence mean; ``token_level_loss=True`` averages over all tokens
    ("token-mean"), False per sequence then over sequences ("seq-mean-token-mean"). With
    ``use_kl_loss`` the actor adds ``init_kl_coef * masked_mean(compute_approx_kl(...))``
    (k1/k2/k3, value clamped to [-10, 10] in recent releases) and subtracts
    ``entropy_loss_coef * masked_mean(entropy)``; without it the KL is folded into the reward
    and is not part of this loss (kl_coef 0 here).

    Example::

        cfg = fastpo.presets.openrlhf(clip_eps_low=0.2, clip_eps_high=0.28, use_kl_loss=True,
                                      init_kl_coef=1e-3, kl_estimator="k3")
        out = fastpo.policy_loss_from_logprobs(action_log_probs, old_action_log_probs, advantages,
                                               action_mask, ref_logprobs=base_action_log_probs, config=cfg)

    Differences: OpenRLHF's masked mean has no guard, so a fully masked sequence gives NaN
    there and 0 here. OpenRLHF always averages the KL and entropy terms over tokens, so with a
    per-sequence policy term (token_level_loss=False or gspo) a nonzero KL / entropy
    coefficient cannot be expressed with one aggregation: that raises ValueError. The vLLM
    importance-sampling correction is not covered.
    """
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"unsupported OpenRLHF policy_loss_type {policy_loss_type!r}; expected 'ppo' or 'gspo'")
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unsupported OpenRLHF kl_estimator {kl_estimator!r}; expected 'k1', 'k2' or 'k3'")
    agg = "token-mean" if token_level_loss and policy_loss_type == "ppo" else "seq-mean-token-mean"
    kl_coef = float(init_kl_coef) if use_kl_loss else 0.0
    entropy_coef = 0.0 if entropy_loss_coef is None else float(entropy_loss_coef)
    if agg != "token-mean" and (kl_coef != 0.0 or entropy_coef != 0.0):
        raise ValueError(
            "OpenRLHF averages the KL and entropy terms over all tokens but this policy term per "
            "sequence (token_level_loss=False or gspo); one aggregation cannot express both. Pass "
            "use_kl_loss=False / entropy_loss_coef=0 here and add those token-mean terms yourself "
            "(fastpo.kl_penalty)."
        )
    return PolicyLossConfig(
        variant=policy_loss_type,
        clip_low=clip_eps_low,
        clip_high=clip_eps_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=10.0,
        entropy_coef=entropy_coef,
        agg=agg,
    )
