"""Verify cases for the fused dpo_loss: loss and gradient against the float64 reference.

The reference is ``dpo_loss_ref`` on float64 ``sequence_logprobs_ref`` of the same
(upcast) logits, lengths from the labels, mean over pairs.
"""
from __future__ import annotations

from typing import Iterator

import torch

from fastpo.functional.dpo_loss import dpo_loss
from fastpo.ops import registry
from fastpo.reference.dpo_loss import LOSS_TYPES, dpo_loss_ref
from fastpo.reference.sequence_logprobs import sequence_logprobs_ref

from . import DTYPES, Check, dtype_name, rel_err

OP = "dpo_loss"
# plain, length-normalised and reference-free representatives at every shape; all types at the first
REPRESENTATIVES = ("sigmoid", "ipo", "simpo")
OPTIONS = {"robust": dict(label_smoothing=0.1), "exo_pair": dict(label_smoothing=0.2), "simpo": dict(gamma=0.5)}


def _shapes(device: torch.device) -> list[tuple[int, int, int]]:
    """(pairs B, T, V): logits are [2B, T, V]."""
    if device.type == "cuda":
        return [(2, 64, 1000), (4, 512, 32000), (2, 512, 151936)]
    return [(2, 5, 17), (2, 4, 4099), (1, 6, 32000)]


def _reference(logits, labels, ref_c, ref_r, lengths, pairs, **kw):
    x = logits.double().requires_grad_()
    logps = sequence_logprobs_ref(x, labels)
    losses, _, _ = dpo_loss_ref(
        logps[:pairs], logps[pairs:], ref_c.double(), ref_r.double(),
        chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:], **kw,
    )
    (grad,) = torch.autograd.grad(losses.mean(), x)
    return losses.mean(), grad


def checks(device: torch.device) -> Iterator[Check]:
    gen = torch.Generator().manual_seed(0)
    for i, (pairs, t, v) in enumerate(_shapes(device)):
        rows = 2 * pairs
        base = torch.randn(rows, t, v, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, v, (rows, t), generator=gen)
        labels[:, : max(1, t // 3)] = -100  # prompt
        labels[0, -1] = -100  # right padding on one row
        ref_logps = sequence_logprobs_ref(base + torch.randn(rows, t, v, generator=gen, dtype=torch.float64), labels)
        labels, ref_logps = labels.to(device), ref_logps.float().to(device)
        ref_c, ref_r = ref_logps[:pairs], ref_logps[pairs:]
        lengths = (labels != -100).sum(-1)
        for loss_type in LOSS_TYPES if i == 0 else REPRESENTATIVES:
            kw = dict(beta=2.0 if loss_type in ("simpo", "sigmoid_norm") else 0.1, loss_type=loss_type,
                      **OPTIONS.get(loss_type, {}))
            for dtype in DTYPES:
                logits = base.to(dtype).to(device)
                loss_r, grad_r = _reference(logits, labels, ref_c, ref_r, lengths, pairs, **kw)
                for backend in registry.backends_for("sequence_logprobs", device):
                    x = logits.clone().requires_grad_()
                    loss = dpo_loss(x, labels, ref_c, ref_r, backend=backend, **kw).loss
                    (grad,) = torch.autograd.grad(loss, x)
                    common = dict(op=OP, backend=backend, dtype=dtype_name(dtype), shape=f"{rows}x{t}x{v}")
                    yield Check(quantity=f"loss ({loss_type})", error=rel_err(loss, loss_r), tol=1e-5, **common)
                    tol_grad = 1e-5 if dtype == torch.float32 else 1.5e-2
                    yield Check(quantity=f"grad ({loss_type})", error=rel_err(grad, grad_r), tol=tol_grad, **common)
