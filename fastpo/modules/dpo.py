"""``DPOLoss``: an ``nn.Module`` holding the DPO-family hyper-parameters.

For now it computes from per-sequence log-probs (``forward_from_logprobs``); the
fused logits forward (``fastpo.dpo_loss``) will be added as ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn

from fastpo.functional.dpo_loss import DPOOutput, _check_dpo_args, dpo_loss_from_logprobs

__all__ = ["DPOLoss"]


class DPOLoss(nn.Module):
    """DPO-family preference loss with fixed ``beta``, ``loss_type``, ``label_smoothing``,
    ``gamma`` and ``reduction`` (validated at construction, same rules as
    :func:`fastpo.functional.dpo_loss.dpo_loss_from_logprobs`, whose docstring gives the
    formulas). Hyper-parameters are plain attributes: changing ``beta`` between steps
    (a schedule) is allowed and costs nothing. No parameters, no buffers.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_dpo_args(beta, loss_type, label_smoothing, reduction, gamma)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.gamma = float(gamma)
        self.reduction = reduction

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
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            gamma=self.gamma,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
            f"gamma={self.gamma}, reduction={self.reduction!r}"
        )
