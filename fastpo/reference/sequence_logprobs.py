"""Reference per-sequence log-probs: the masked sum (or mean) over T of token log-probs.

For logits z [B, T, V], labels y [B, T], temperature tau and keep_bt = (y_bt != ignore_index):

    logp_bt = z_bt,y / tau - logsumexp_j(z_btj / tau)          (0 where not kept)
    out_b   = sum_t logp_bt                                     (average=False)
    out_b   = sum_t logp_bt / max(1, sum_t keep_bt)             (average=True; 0 for an empty sequence)

`sequence_logprobs_ref` is the oracle (autograd, float64 for float64 logits).
`sequence_sum` and `sequence_grad_logp` are the per-sequence reduction and its
gradient that the ``torch`` and ``triton`` backends put around the per-token
kernels. The sum is a fixed pairwise tree in float64 built from elementwise
adds, so a sequence's value depends on its own tokens only: bitwise the same
whatever the batch, the device, or trailing ignored (zero) padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .token_logprobs import token_logprobs_ref

__all__ = ["sequence_logprobs_ref", "sequence_sum", "sequence_grad_logp"]


def sequence_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    average: bool = False,
) -> torch.Tensor:
    """Oracle: ``[B]`` masked sum (mean if ``average``) of token log-probs of ``logits [B, T, V]``.

    Computes in float64 for float64 logits, else float32; differentiable.
    """
    logp, _ = token_logprobs_ref(logits, labels, temperature=temperature, ignore_index=ignore_index)
    total = logp.sum(-1)
    if average:
        count = (labels != ignore_index).sum(-1).clamp_min(1)
        total = total / count.to(total.dtype)
    return total


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by a fixed pairwise tree (zero-padded to a power of two)."""
    t = x.shape[-1]
    if t == 0:
        return x.new_zeros(x.shape[:-1])
    width = 1 << (t - 1).bit_length()
    if width != t:
        x = F.pad(x, (0, width - t))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def sequence_sum(
    logp: torch.Tensor,  # [B, T] per-token log-probs, 0 at ignored positions
    labels: torch.Tensor,  # [B, T]
    ignore_index: int,
    average: bool,
) -> torch.Tensor:
    """``[B]`` in ``logp``'s dtype: the masked sum (mean if ``average``), accumulated in float64."""
    total = _tree_sum(logp.to(torch.float64))
    if average:
        count = (labels != ignore_index).sum(-1).clamp_min(1)
        total = total / count.to(torch.float64)
    return total.to(logp.dtype)


def sequence_grad_logp(
    grad_out: torch.Tensor,  # [B] upstream gradient of the per-sequence output
    labels: torch.Tensor,  # [B, T]
    ignore_index: int,
    average: bool,
) -> torch.Tensor:
    """Upstream gradient of each token log-prob, ``[B, T]`` contiguous in ``grad_out``'s dtype:
    ``g_b`` (sum) or ``g_b / max(1, count_b)`` (mean) on kept tokens, 0 elsewhere."""
    scale = grad_out
    if average:
        count = (labels != ignore_index).sum(-1).clamp_min(1)
        scale = grad_out / count.to(grad_out.dtype)
    keep = labels != ignore_index
    return torch.where(keep, scale.unsqueeze(-1), torch.zeros((), dtype=scale.dtype, device=scale.device))
