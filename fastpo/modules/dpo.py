"""``DPOLoss``: an ``nn.Module`` holding the DPO-family hyper-parameters.

``forward`` runs the fused path from the policy's logits (``fastpo.dpo_loss``);
``forward_from_logprobs`` computes from per-sequence log-probs.
"""
from __future__ import annotations

import torch
from torch import nn

from fastpo._validation import check_temperature
from fastpo.functional.dpo_loss import DPOOutput, _check_dpo_args, dpo_loss, dpo_loss_from_logprobs
from fastpo.functional.linear import linear_dpo_loss

from .policy import head_weight_bias

__all__ = ["DPOLoss"]


class DPOLoss(nn.Module):
    """DPO-family preference loss with fixed ``beta``, ``loss_type``, ``label_smoothing``,
    ``gamma`` and ``reduction`` (validated at construction, same rules as
    :func:`fastpo.functional.dpo_loss.dpo_loss_from_logprobs`, whose docstring gives the
    formulas), plus the options of the fused logits path: ``temperature``, ``ignore_index``,
    ``inplace_backward`` and ``backend`` (see :func:`fastpo.functional.dpo_loss.dpo_loss`).
    Hyper-parameters are plain attributes: changing ``beta`` between steps (a schedule) is
    allowed and costs nothing. No parameters, no buffers.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        reduction: str = "mean",
        *,
        temperature: float = 1.0,
        ignore_index: int = -100,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_dpo_args(beta, loss_type, label_smoothing, reduction, gamma)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.temperature = check_temperature(temperature)
        self.ignore_index = int(ignore_index)
        self.inplace_backward = bool(inplace_backward)
        self.backend = backend

    def _loss_options(self) -> dict:
        """The loss hyper-parameters both paths take, read at call time (schedules allowed)."""
        return dict(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                    gamma=self.gamma, reduction=self.reduction)

    def forward(
        self,
        logits: torch.Tensor,  # [2B, T, V]: B chosen rows, then B rejected rows
        labels: torch.Tensor,  # [2B, T], ignore_index on prompt and padding
        ref_chosen_logps: torch.Tensor | None = None,  # [B] summed reference log-probs; None only for simpo
        ref_rejected_logps: torch.Tensor | None = None,  # [B]
    ) -> DPOOutput:
        """Fused path: ``fastpo.dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, ...)``."""
        return dpo_loss(
            logits,
            labels,
            ref_chosen_logps,
            ref_rejected_logps,
            **self._loss_options(),
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def forward_hidden(
        self,
        hidden: torch.Tensor,  # [2B, T, H]: B chosen rows, then B rejected rows
        lm_head,  # nn.Linear(H, V) or its weight [V, H]
        labels: torch.Tensor,  # [2B, T]
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> DPOOutput:
        """From hidden states and the output head: ``fastpo.linear_dpo_loss`` with this module's
        options (logits never materialised; ``inplace_backward`` does not apply)."""
        weight, bias = head_weight_bias(lm_head, bias)
        return linear_dpo_loss(
            hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias=bias, **self._loss_options(),
            temperature=self.temperature, logit_scale=logit_scale, softcap=softcap, ignore_index=self.ignore_index,
            chunk_size=chunk_size, backend=self.backend,
        )

    def forward_from_logprobs(
        self,
        chosen_logps: torch.Tensor,  # [B] sum of completion-token log-probs
        rejected_logps: torch.Tensor,  # [B]
        ref_chosen_logps: torch.Tensor | None = None,  # [B]; None only for simpo
        ref_rejected_logps: torch.Tensor | None = None,  # [B]
        *,
        chosen_lengths: torch.Tensor | None = None,  # [B] completion tokens (ipo, sigmoid_norm, simpo)
        rejected_lengths: torch.Tensor | None = None,  # [B]
    ) -> DPOOutput:
        """``DPOOutput(loss, chosen_rewards, rejected_rewards, margins, accuracy)``."""
        return dpo_loss_from_logprobs(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self._loss_options(),
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
            f"gamma={self.gamma}, reduction={self.reduction!r}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, inplace_backward={self.inplace_backward}, backend={self.backend!r}"
        )
