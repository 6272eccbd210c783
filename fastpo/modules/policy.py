"""``PolicyLoss`` and ``ValueLoss``: ``nn.Module`` wrappers of the PPO-family losses.

``PolicyLoss`` holds a frozen ``PolicyLossConfig`` and a default backend; ``forward`` computes
from per-token log-probs (``forward_from_logprobs``), ``forward_logits`` from logits with the
fused path (``fastpo.policy_loss``), ``forward_hidden`` from hidden states and the lm_head
(``fastpo.linear_policy_loss``, logits never materialised), all with the same config.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastpo.config import PolicyLossConfig, PolicyLossOutput
from fastpo.functional.advantages import check_value_loss_args, value_loss
from fastpo.functional.linear import linear_policy_loss
from fastpo.functional.policy_loss import policy_loss, policy_loss_from_logprobs
from fastpo.ops.registry import BACKENDS

__all__ = ["PolicyLoss", "ValueLoss"]


class PolicyLoss(nn.Module):
    """Policy-gradient loss (PPO / GRPO / DAPO / Dr. GRPO / GSPO / CISPO / SAPO / GMPO / VESPO / PG).

    ``PolicyLoss(config)`` or ``PolicyLoss(clip_high=0.28, agg="token-mean", ...)`` (keyword
    overrides are applied to ``config`` or to the defaults). Presets:
    ``PolicyLoss(fastpo.presets.trl_grpo(loss_type="dapo"))``. The config is validated at
    construction and can be swapped between steps (``module.config = ...``); no parameters,
    no buffers. ``backend`` is the default of ``forward_logits`` ("auto": fastest available for
    the logits' device). Formulas and shapes: ``fastpo.functional.policy_loss``.
    """

    def __init__(self, config: PolicyLossConfig | None = None, *, backend: str = "auto", **overrides) -> None:
        super().__init__()
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
        self.backend = backend
        if config is None:
            config = PolicyLossConfig(**overrides)
        elif not isinstance(config, PolicyLossConfig):
            raise TypeError(f"config must be a fastpo.PolicyLossConfig, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config

    def forward(
        self,
        logprobs: torch.Tensor,  # [B, T]
        old_logprobs: torch.Tensor,  # [B, T]
        advantages: torch.Tensor,  # [B] or [B, T]
        mask: torch.Tensor,  # [B, T]
        ref_logprobs: torch.Tensor | None = None,  # [B, T]
        entropy: torch.Tensor | None = None,  # [B, T]
        num_tokens=None,
        num_sequences=None,
        policy_weights: torch.Tensor | None = None,  # [B] or [B, T]
        rollout_logprobs: torch.Tensor | None = None,  # [B, T]
        aux_num_tokens=None,
    ) -> PolicyLossOutput:
        """``PolicyLossOutput(loss, per_token_loss, metrics)`` from per-token log-probs."""
        return self.forward_from_logprobs(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            policy_weights=policy_weights,
            rollout_logprobs=rollout_logprobs,
            aux_num_tokens=aux_num_tokens,
        )

    def forward_from_logprobs(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        ref_logprobs: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        num_tokens=None,
        num_sequences=None,
        policy_weights: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        aux_num_tokens=None,
    ) -> PolicyLossOutput:
        return policy_loss_from_logprobs(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            config=self.config,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            policy_weights=policy_weights,
            rollout_logprobs=rollout_logprobs,
            aux_num_tokens=aux_num_tokens,
        )

    def forward_logits(
        self,
        logits: torch.Tensor,  # [B, T, V]
        labels: torch.Tensor,  # [B, T]
        old_logprobs: torch.Tensor,  # [B, T]
        advantages: torch.Tensor,  # [B] or [B, T]
        *,
        mask: torch.Tensor | None = None,  # [B, T]
        ref_logprobs: torch.Tensor | None = None,  # [B, T]
        num_tokens=None,
        num_sequences=None,
        policy_weights: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        aux_num_tokens=None,
        ignore_index: int = -100,
        inplace_backward: bool = False,
        backend: str | None = None,
    ) -> PolicyLossOutput:
        """Fused from logits (``fastpo.policy_loss``); ``backend=None`` uses ``self.backend``."""
        return policy_loss(
            logits,
            labels,
            old_logprobs,
            advantages,
            mask=mask,
            ref_logprobs=ref_logprobs,
            config=self.config,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            policy_weights=policy_weights,
            rollout_logprobs=rollout_logprobs,
            aux_num_tokens=aux_num_tokens,
            ignore_index=ignore_index,
            inplace_backward=inplace_backward,
            backend=self.backend if backend is None else backend,
        )

    def forward_hidden(
        self,
        hidden: torch.Tensor,  # [B, T, H]
        lm_head,  # nn.Linear(H, V) or its weight [V, H]
        labels: torch.Tensor,  # [B, T]
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        *,
        backend: str | None = None,
        **kwargs,
    ) -> PolicyLossOutput:
        """From hidden states and the output head (``fastpo.linear_policy_loss``; keyword
        arguments as there: mask, ref_logprobs, counts, policy_weights, logit_scale, softcap,
        chunk_size, ...); ``lm_head`` is an ``nn.Linear`` (its bias is used) or a weight."""
        weight, bias = head_weight_bias(lm_head, kwargs.pop("bias", None))
        return linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, bias=bias, config=self.config,
                                  backend=self.backend if backend is None else backend, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.config!r}, backend={self.backend!r}"


def head_weight_bias(lm_head, bias=None):
    """``(weight [V, H], bias or None)`` of an ``nn.Linear`` or of a bare weight tensor."""
    if isinstance(lm_head, nn.Linear):
        if bias is not None:
            raise ValueError("pass bias only with a bare weight; an nn.Linear brings its own")
        return lm_head.weight, lm_head.bias
    if isinstance(lm_head, torch.Tensor):
        return lm_head, bias
    raise TypeError(f"lm_head must be an nn.Linear or a weight tensor [V, H], got {type(lm_head).__name__}")


class ValueLoss(nn.Module):
    """Clipped PPO value loss, ``0.5 * max((v - R)^2, (v_clip - R)^2)`` aggregated by ``agg``.

    See ``fastpo.functional.advantages.value_loss``. ``clip=None`` disables clipping.
    """

    def __init__(self, clip: float | None = 0.2, agg: str = "token-mean", agg_scale: float | None = None) -> None:
        super().__init__()
        check_value_loss_args(clip, agg, agg_scale)
        self.clip = None if clip is None else float(clip)
        self.agg = agg
        self.agg_scale = None if agg_scale is None else float(agg_scale)

    def forward(
        self,
        values: torch.Tensor,  # [B, T]
        old_values: torch.Tensor,  # [B, T]
        returns: torch.Tensor,  # [B, T]
        mask: torch.Tensor,  # [B, T]
        num_tokens=None,
        num_sequences=None,
    ) -> torch.Tensor:
        return value_loss(
            values,
            old_values,
            returns,
            mask,
            clip=self.clip,
            agg=self.agg,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            agg_scale=self.agg_scale,
        )

    def extra_repr(self) -> str:
        return f"clip={self.clip}, agg={self.agg!r}, agg_scale={self.agg_scale}"
