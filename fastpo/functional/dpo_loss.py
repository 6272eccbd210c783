"""DPO-family preference losses (public functions).

``dpo_loss_from_logprobs`` works on per-sequence log-prob sums and is plain
PyTorch (the math is O(B), nothing to fuse). ``dpo_loss`` (DESIGN section 4,
level 2) goes from the policy's logits: the fused ``sequence_logprobs`` does all
the vocabulary-sized work, then the same ``dpo_loss_from_logprobs`` math runs on
the ``[2B]`` sums, so both entry points share one formula place.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastpo._validation import check_sequence_logits, check_temperature
from fastpo.functional.sequence_logprobs import sequence_logprobs
from fastpo.reference.dpo_loss import LENGTH_NORMALIZED, LOSS_TYPES, REFERENCE_FREE, dpo_loss_ref

__all__ = ["DPOOutput", "dpo_loss_from_logprobs", "dpo_loss"]

REDUCTIONS = ("mean", "sum", "none")


class DPOOutput(NamedTuple):
    """Result of a DPO-family loss.

    loss:             scalar (reduction "mean" / "sum") or ``[B]`` ("none"); fp32 (fp64 for fp64 inputs).
    chosen_rewards:   ``[B]`` detached implicit rewards ``beta * (logpi - logpi_ref)``
                      (simpo: ``beta * logpi / length``).
    rejected_rewards: ``[B]`` detached, same definition.
    margins:          ``[B]`` ``chosen_rewards - rejected_rewards`` (detached).
    accuracy:         ``(chosen_rewards > rejected_rewards)`` as float: ``[B]`` for reduction
                      "none", else its mean over the batch (a scalar, also for "sum").
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def _check_dpo_args(beta: float, loss_type: str, label_smoothing: float, reduction: str, gamma: float = 0.0) -> None:
    """Validate the non-tensor options shared by every DPO entry point (clear ValueErrors)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    try:
        beta_f, ls_f, gamma_f = float(beta), float(label_smoothing), float(gamma)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"beta, label_smoothing and gamma must be real numbers: {exc}") from None
    if not (math.isfinite(beta_f) and beta_f > 0.0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (0.0 <= ls_f < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if not math.isfinite(gamma_f):
        raise ValueError(f"gamma must be finite, got {gamma!r}")


def _check_lengths(
    loss_type: str,
    batch: int,
    device: torch.device,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
) -> None:
    """Lengths must be ``[B]`` real tensors; length-normalised types need them, all > 0."""
    needed = loss_type in LENGTH_NORMALIZED
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is None:
            if needed:
                raise ValueError(
                    f"loss_type {loss_type!r} is length-normalised and needs {name} "
                    f"(number of completion tokens per sequence, shape [{batch}])"
                )
            continue
        if not isinstance(lengths, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.dtype == torch.bool or lengths.is_complex():
            raise ValueError(f"{name} must hold integer or real token counts, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"{name} must have shape [{batch}] like chosen_logps, got {list(lengths.shape)}")
        if lengths.device != device:
            raise ValueError(f"{name} is on {lengths.device}, the log-probs on {device}")
        if needed:
            bad = (~(lengths > 0)).nonzero().flatten()  # also catches NaN
            if bad.numel() > 0:
                raise ValueError(
                    f"{name} must be > 0 for length-normalised loss_type {loss_type!r}: "
                    f"sequence(s) {bad.tolist()[:8]} have no completion tokens"
                )


def _check_logps_types(named: dict, loss_type: str) -> None:
    """Each per-sequence input is a floating-point tensor; only simpo may omit the reference."""
    for name, t in named.items():
        if t is None:
            if loss_type in REFERENCE_FREE and name.startswith("ref_"):
                continue
            if name.startswith("ref_"):
                raise ValueError(
                    f"{name} is None: loss_type {loss_type!r} needs reference log-probs "
                    f"(only {sorted(REFERENCE_FREE)} is reference-free)"
                )
            raise ValueError(f"{name} must be a tensor, got None")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_logps_shapes(named: dict, batch: int, device: torch.device, like: str, where: str) -> None:
    """Each given per-sequence input is ``[batch]`` on ``device``."""
    for name, t in named.items():
        if t is None:
            continue
        if tuple(t.shape) != (batch,):
            raise ValueError(f"{name} must have shape [{batch}] {like}, got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, {where} on {device}")


def _reduce_dpo(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, reduction: str
) -> DPOOutput:
    """The one place where DPO losses and accuracy are reduced."""
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)
    if reduction == "mean":
        loss, accuracy = losses.mean(), accuracy.mean()
    elif reduction == "sum":
        loss, accuracy = losses.sum(), accuracy.mean()
    else:
        loss = losses
    return DPOOutput(loss, chosen_rewards, rejected_rewards, margins, accuracy)


def dpo_loss_from_logprobs(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
) -> DPOOutput:
    r"""DPO-family preference loss on per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: ``[B]`` float (any float dtype), the policy's SUM of
            completion-token log-probs for the preferred / dispreferred completion.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` float, the same for the reference model.
            May be ``None`` only for the reference-free ``"simpo"`` (which ignores them anyway).
        beta: > 0. The DPO temperature (IPO's tau, SimPO's beta).
        loss_type: one of ``sigmoid, ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, apo_zero,
            apo_down, exo_pair, sigmoid_norm, simpo``.
        label_smoothing: eps in [0, 0.5). Used by sigmoid (cDPO), robust (flip probability),
            exo_pair (EXO's epsilon; 1e-3 when 0) and simpo; ignored by the other types.
        gamma: SimPO's target reward margin (used by simpo only). TRL ``CPOConfig.simpo_gamma`` is
            this gamma; princeton-nlp/SimPO's ``gamma_beta_ratio`` equals ``gamma / beta``.
        chosen_lengths, rejected_lengths: ``[B]`` integer or float counts of completion tokens.
            Required (and all > 0) for the length-normalised ipo, sigmoid_norm and simpo.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over the batch.

    With ``dc = chosen_logps - ref_chosen_logps``, ``dr = rejected_logps - ref_rejected_logps``,
    ``z = beta (dc - dr)``, eps = label_smoothing and sigma the logistic function:

    - sigmoid: ``-(1-eps) log sigma(z) - eps log sigma(-z)`` (DPO, Rafailov et al. 2023; cDPO)
    - ipo: ``(dc/L_c - dr/L_r - 1/(2 beta))^2`` (IPO, Azar et al. 2023; length-normalised as TRL)
    - hinge: ``relu(1 - z)`` (SLiC, Zhao et al. 2023)
    - robust: ``((1-eps)(-log sigma(z)) + eps log sigma(-z)) / (1 - 2 eps)`` (Chowdhury et al. 2024)
    - bco_pair: ``-log sigma(beta dc) - log sigma(-beta dr)`` (BCO, Jung et al. 2024; no running mean)
    - sppo_hard: ``(dc - 1/(2 beta))^2 + (dr + 1/(2 beta))^2`` (SPPO, Wu et al. 2024)
    - nca_pair: ``-log sigma(beta dc) - (log sigma(-beta dc) + log sigma(-beta dr)) / 2`` (NCA, Chen et al. 2024)
    - apo_zero: ``1 - sigma(beta dc) + sigma(beta dr)``; apo_down: ``sigma(beta dc) + 1 - sigma(z)``
      (APO, D'Oosterlinck et al. 2024)
    - exo_pair: ``sigma(z)(log sigma(z) - log(1-e)) + sigma(-z)(log sigma(-z) - log e)``,
      ``e = eps or 1e-3`` (EXO, Ji et al. 2024)
    - sigmoid_norm: ``-log sigma(beta (dc/L_c - dr/L_r))`` (length-normalised DPO, Tulu 3)
    - simpo: ``-(1-eps) log sigma(s) - eps log sigma(-s)``, ``s = beta (c/L_c - r/L_r) - gamma``
      (SimPO, Meng et al. 2024; reference-free)

    Formulas match TRL 1.13.0 ``DPOTrainer`` (reverse-KL), ``CPOTrainer`` for simpo, and TRL <= 0.28
    for sigmoid's label smoothing and exo_pair's default epsilon. Computation is in float32
    (float64 if any input is float64); gradients flow back to the inputs in their own dtype.

    Returns:
        ``DPOOutput(loss, chosen_rewards, rejected_rewards, margins, accuracy)``; rewards are
        ``beta * dc`` / ``beta * dr`` (simpo: ``beta * c/L_c`` / ``beta * r/L_r``), detached, ``[B]``.
    """
    _check_dpo_args(beta, loss_type, label_smoothing, reduction, gamma)
    named = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _check_logps_types(named, loss_type)
    if chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps must have shape [B] (one value per sequence), got {list(chosen_logps.shape)}")
    batch, device = chosen_logps.shape[0], chosen_logps.device
    if batch == 0:
        raise ValueError("empty batch: chosen_logps has shape [0]")
    _check_logps_shapes(named, batch, device, "like chosen_logps", "chosen_logps")
    _check_lengths(loss_type, batch, device, chosen_lengths, rejected_lengths)

    losses, chosen_rewards, rejected_rewards = dpo_loss_ref(
        chosen_logps,
        rejected_logps,
        None if loss_type in REFERENCE_FREE else ref_chosen_logps,
        None if loss_type in REFERENCE_FREE else ref_rejected_logps,
        beta=float(beta),
        loss_type=loss_type,
        label_smoothing=float(label_smoothing),
        gamma=float(gamma),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    return _reduce_dpo(losses, chosen_rewards, rejected_rewards, reduction)


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reduction: str = "mean",
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group=None,
    backend: str = "auto",
) -> DPOOutput:
    r"""DPO-family preference loss from the policy's logits (TRL's concatenated forward), fused.

    Args:
        logits: ``[2B, T, V]`` float32 / bfloat16 / float16, aligned with ``labels`` (for a causal
            LM: ``logits[:, :-1]`` with ``labels[:, 1:]``; B and T strides are read in place).
            Rows ``0..B-1`` are the chosen completions, rows ``B..2B-1`` the rejected ones,
            pair ``i`` being rows ``i`` and ``B + i``.
        labels: ``[2B, T]`` integer; prompt and padding positions hold ``ignore_index``.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` float, the reference model's SUMMED
            completion log-probs on the same device, e.g. ``sequence_logprobs(ref_logits, labels)``
            under ``torch.no_grad()`` split into halves. ``None`` is accepted for ``"simpo"`` only.
        beta, loss_type, label_smoothing, gamma, reduction: as in :func:`dpo_loss_from_logprobs`,
            whose docstring gives every formula.
        temperature: runtime divisor of the logits.
        inplace_backward: write dL/dlogits into the logits buffer (no second N x V allocation).
        process_group: vocabulary parallel: ``logits`` is this rank's shard ``[2B, T, V_r]``,
            ``labels`` global ids (as :func:`fastpo.sequence_logprobs`); same result on every
            rank, each rank gets its gradient slice.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.

    The policy log-probs are ``c, r = sequence_logprobs(logits, labels)`` split into halves, and
    the completion lengths ``L_c, L_r`` of the length-normalised ipo, sigmoid_norm and simpo are
    the counts of non-ignored labels per row; the result is exactly that of
    ``dpo_loss_from_logprobs(c, r, ref_chosen_logps, ref_rejected_logps, chosen_lengths=L_c,
    rejected_lengths=L_r, ...)``, since that is what runs.

    Memory traffic, with N = 2B * T rows of V logits: the forward reads the logits once (pass 1)
    and keeps only ``[N]`` log-sum-exps; the loss math on ``[2B]`` values is negligible; the
    backward reads the logits once more (pass 2) and writes the gradient once (pass 3), into a
    new N x V buffer, the only N x V intermediate. Three is the least for an exact gradient
    that saves no N x V state between forward and backward: p_j needs the row's log-sum-exp,
    known only after a full read. With ``inplace_backward=True`` the backward rewrites the
    logits buffer block by block, each block read just before it is overwritten: two sweeps
    over one N x V buffer (forward read, backward read-modify-write) and no N x V allocation
    at all; the bytes moved are the same.

    Returns:
        ``DPOOutput(loss, chosen_rewards, rejected_rewards, margins, accuracy)``.

    Raises:
        ValueError before any kernel runs: logits not ``[2B, T, V]`` with an even number of
        rows, labels not ``[2B, T]`` or out of range, reference log-probs not ``[B]`` on the
        logits' device, bad hyper-parameters, or (length-normalised types) a sequence with no
        completion token.
    """
    _check_dpo_args(beta, loss_type, label_smoothing, reduction, gamma)
    check_sequence_logits(logits, labels, ignore_index)
    temperature = check_temperature(temperature)
    rows = logits.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"logits must hold 2B rows (B chosen, then B rejected) with B >= 1, got {rows} rows"
        )
    batch, device = rows // 2, logits.device
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    _check_logps_types(refs, loss_type)
    _check_logps_shapes(refs, batch, device, f"(one per pair: logits has {rows} rows = 2 x {batch})", "logits")
    lengths = (labels != ignore_index).sum(-1)
    if loss_type in LENGTH_NORMALIZED:
        empty = (lengths == 0).nonzero().flatten()
        if empty.numel() > 0:
            raise ValueError(
                f"loss_type {loss_type!r} divides by the completion length, but row(s) "
                f"{empty.tolist()[:8]} of labels have no completion token (every label == ignore_index)"
            )
    logps = sequence_logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index,
        inplace_backward=inplace_backward, process_group=process_group, backend=backend,
    )
    return dpo_loss_from_logprobs(
        logps[:batch], logps[batch:], ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
        chosen_lengths=lengths[:batch], rejected_lengths=lengths[batch:], reduction=reduction,
    )
