"""Reference DPO-family preference losses on per-sequence log-probs.

Inputs are per-sequence SUMS of completion-token log-probs, ``[B]``:
``c = log pi(y_w | x)``, ``r = log pi(y_l | x)`` for the policy and ``c_ref``,
``r_ref`` for the reference model. With

    dc = c - c_ref                 (chosen log-ratio)
    dr = r - r_ref                 (rejected log-ratio)
    d  = dc - dr                   (the DPO "logits")
    z  = beta * d
    eps = label_smoothing
    L_c, L_r = completion lengths (number of completion tokens)

the per-pair losses are (sigma = sigmoid, log sigma = logsigmoid):

    sigmoid       -(1 - eps) log sigma(z) - eps log sigma(-z)             DPO (Rafailov 2023);
                                                                          eps > 0: conservative DPO (cDPO)
    ipo           (dc / L_c - dr / L_r - 1 / (2 beta))^2                  IPO (Azar 2023), length-normalised as TRL
    hinge         relu(1 - z)                                             SLiC hinge (Zhao 2023)
    robust        ((1 - eps)(-log sigma(z)) + eps log sigma(-z)) / (1 - 2 eps)
                                                                          robust DPO (Chowdhury 2024)
    bco_pair      -log sigma(beta dc) - log sigma(-beta dr)               BCO (Jung 2024), running-mean shift = 0
    sppo_hard     (dc - 1 / (2 beta))^2 + (dr + 1 / (2 beta))^2           SPPO (Wu 2024), hard probabilities
    nca_pair      -log sigma(beta dc) - 1/2 log sigma(-beta dc) - 1/2 log sigma(-beta dr)
                                                                          NCA (Chen 2024)
    apo_zero      1 - sigma(beta dc) + sigma(beta dr)                     APO-zero (D'Oosterlinck 2024, eq. 7)
    apo_down      sigma(beta dc) + 1 - sigma(z)                           APO-down (D'Oosterlinck 2024, eq. 8)
    exo_pair      sigma(z)(log sigma(z) - log(1 - e)) + sigma(-z)(log sigma(-z) - log e)
                  with e = eps if eps > 0 else 1e-3                       EXO-pref (Ji 2024, eq. 16)
    sigmoid_norm  -log sigma(beta (dc / L_c - dr / L_r))                  length-normalised DPO (Tulu 3)
    simpo         -(1 - eps) log sigma(s) - eps log sigma(-s),
                  s = beta (c / L_c - r / L_r) - gamma                    SimPO (Meng 2024), reference-free

Rewards (detached): ``beta * dc`` and ``beta * dr`` for every type (also the
length-normalised ipo / sigmoid_norm, as TRL logs them), except simpo, which
has no reference: ``beta * c / L_c`` and ``beta * r / L_r`` (TRL CPOTrainer).

Matched against TRL 1.13.0 ``DPOTrainer._compute_loss`` (f_divergence_type
"reverse_kl", no WPO weighting); two points follow TRL <= 0.28
``DPOTrainer.dpo_loss`` because 1.13 dropped them: the cDPO label smoothing of
``sigmoid`` (identical when eps = 0) and exo_pair's ``e = 1e-3`` when eps = 0
(1.13 would take log(0)). simpo follows TRL ``CPOTrainer`` (loss_type="simpo"),
whose ``simpo_gamma`` is this ``gamma``; princeton-nlp/SimPO's
``gamma_beta_ratio`` is ``gamma / beta``.

Computes in float64 for float64 inputs, else float32. Differentiable through
autograd. No reduction here: the public function reduces.
"""
from __future__ import annotations

import math

import torch

from ._dtypes import acc_dtype
import torch.nn.functional as F

__all__ = ["dpo_loss_ref", "LOSS_TYPES", "LENGTH_NORMALIZED", "REFERENCE_FREE", "EXO_DEFAULT_EPS"]

LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "exo_pair",
    "sigmoid_norm",
    "simpo",
)
# Types that divide sequence log-probs by the completion length.
LENGTH_NORMALIZED = frozenset({"ipo", "sigmoid_norm", "simpo"})
# Types that never read the reference log-probs.
REFERENCE_FREE = frozenset({"simpo"})
# EXO's epsilon when label_smoothing == 0 (TRL <= 0.28 default).
EXO_DEFAULT_EPS = 1e-3


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The shared accumulation rule (``acc_dtype``) over several inputs: float64 if any is."""
    return acc_dtype(next((t.dtype for t in tensors if t is not None and t.dtype == torch.float64), torch.float32))


def dpo_loss_ref(
    chosen_logps: torch.Tensor,  # [B] sum of completion-token log-probs, policy
    rejected_logps: torch.Tensor,  # [B]
    ref_chosen_logps: torch.Tensor | None,  # [B] reference model; None only for simpo
    ref_rejected_logps: torch.Tensor | None,  # [B]
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,  # [B] completion tokens, for LENGTH_NORMALIZED
    rejected_lengths: torch.Tensor | None = None,  # [B]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Oracle: ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.

    See the module docstring for the formulas. Results are float32 (float64 when
    any input is float64); rewards are detached. Does not validate ranges (that
    is the public function's job) beyond what the formula itself needs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    acc = _acc_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    c = chosen_logps.to(acc)
    r = rejected_logps.to(acc)
    eps = float(label_smoothing)

    if loss_type in LENGTH_NORMALIZED:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        len_c = chosen_lengths.to(acc)
        len_r = rejected_lengths.to(acc)

    if loss_type == "simpo":
        avg_c, avg_r = c / len_c, r / len_r
        s = beta * (avg_c - avg_r) - gamma
        losses = -(1.0 - eps) * F.logsigmoid(s) - eps * F.logsigmoid(-s)
        return losses, (beta * avg_c).detach(), (beta * avg_r).detach()

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    dc = c - ref_chosen_logps.to(acc)
    dr = r - ref_rejected_logps.to(acc)
    z = beta * (dc - dr)

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (dc / len_c - dr / len_r - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * dc) - F.logsigmoid(-beta * dr)
    elif loss_type == "sppo_hard":
        losses = (dc - 0.5 / beta) ** 2 + (dr + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        rc, rr = beta * dc, beta * dr
        losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    elif loss_type == "apo_zero":
        losses = (1.0 - torch.sigmoid(beta * dc)) + torch.sigmoid(beta * dr)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * dc) + (1.0 - torch.sigmoid(z))
    elif loss_type == "exo_pair":
        e = eps if eps > 0.0 else EXO_DEFAULT_EPS
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(e)
        )
    else:  # sigmoid_norm
        losses = -F.logsigmoid(beta * (dc / len_c - dr / len_r))

    return losses, (beta * dc).detach(), (beta * dr).detach()
