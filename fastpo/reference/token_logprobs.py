"""Reference log-softmax gather and entropy.

For logits z over a vocabulary of size V, temperature tau and label y:

    x      = z / tau
    lse    = log sum_j exp(x_j)
    logp   = x_y - lse
    H      = -sum_j p_j log p_j,   p = softmax(x)

`token_logprobs_ref` is the oracle: differentiable through autograd, computes in
float64 when given float64 (else float32), and materialises the full [N, V]
log-softmax. `token_logprobs_chunked_fwd/bwd` are the memory-light forward and
analytic backward used by the ``torch`` backend: they hold at most
``chunk_rows x V`` float32 temporaries at a time.
"""
from __future__ import annotations

import torch

from ._dtypes import acc_dtype

__all__ = [
    "token_logprobs_ref", "token_logprobs_chunked_fwd", "token_logprobs_chunked_bwd", "finite_logp", "row_chunks",
]


def token_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: ``(logprobs, entropy)`` shaped like ``labels``; ignored positions give 0.

    logits ``[..., V]`` any float dtype; labels ``[...]`` integer. Computes in float64
    for float64 logits, else float32. Differentiable with respect to ``logits``.
    """
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * finite_logp(logp_all)).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(keep, logp, zero), torch.where(keep, entropy, zero)


def finite_logp(log_p: torch.Tensor) -> torch.Tensor:
    """log p with the -inf of a masked vocabulary entry (p = 0) replaced by 0, so that the
    entropy terms p * log p are 0 there (0 log 0 = 0) and their gradient is 0, not NaN. NaN
    stays NaN (it must propagate)."""
    return log_p.masked_fill(log_p == float("-inf"), 0.0)


def _chunk_rows(n_rows: int, vocab: int, budget_elems: int = 1 << 22) -> int:
    return max(1, min(n_rows, budget_elems // max(vocab, 1)))


def row_chunks(logits: torch.Tensor, step: int):
    """``(rows, view)`` pairs covering logits ``[N, V]`` or ``[R, C, V]`` (row r = i * C + j):
    ``view`` is a 2-D ``[k, V]`` view (never a copy) of the flat rows ``rows`` (a slice)."""
    if logits.dim() == 2:
        n = logits.shape[0]
        for start in range(0, n, step):
            stop = min(n, start + step)
            yield slice(start, stop), logits[start:stop]
        return
    r, c, _ = logits.shape
    for i in range(r):
        for start in range(0, c, step):
            stop = min(c, start + step)
            yield slice(i * c + start, i * c + stop), logits[i, start:stop]


def token_logprobs_chunked_fwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V] (N = R * C), unit stride along V
    labels: torch.Tensor,  # [N] int64
    temperature: float,
    ignore_index: int,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the torch backend: ``(logp, entropy, lse)``, each ``[N]``.

    Rows are processed ``chunk_rows`` at a time so no full [N, V] float32 buffer
    exists. Each row's result depends on that row alone (batch invariant).
    """
    n, v = labels.numel(), logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    logp = torch.zeros(n, dtype=acc, device=logits.device)
    entropy = torch.zeros(n, dtype=acc, device=logits.device)
    lse = torch.zeros(n, dtype=acc, device=logits.device)
    step = chunk_rows or _chunk_rows(n, v)
    for rows, block in row_chunks(logits, step):
        x = block.to(acc) / temperature
        lab = labels[rows]
        keep = lab != ignore_index
        safe = torch.where(keep, lab, torch.zeros_like(lab))
        c_lse = torch.logsumexp(x, dim=-1)
        shifted = x - c_lse.unsqueeze(-1)  # log p
        c_logp = shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        c_ent = -(shifted.exp() * finite_logp(shifted)).sum(-1)
        zero = torch.zeros((), dtype=acc, device=logits.device)
        logp[rows] = torch.where(keep, c_logp, zero)
        entropy[rows] = torch.where(keep, c_ent, zero)
        lse[rows] = c_lse
    return logp, entropy, lse


def token_logprobs_chunked_bwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V] (N = R * C)
    labels: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N] from the forward
    entropy: torch.Tensor,  # [N] from the forward
    grad_logp: torch.Tensor,  # [N]
    grad_entropy: torch.Tensor | None,  # [N] or None
    temperature: float,
    ignore_index: int,
    grad_out: torch.Tensor,  # logits' shape and dtype, unit stride along V; may be `logits` itself
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Analytic backward of the torch backend, written chunk by chunk into ``grad_out``.

    d logp / d z_j = (1[j = y] - p_j) / tau
    d H    / d z_j = -p_j (log p_j + H) / tau
    """
    n, v = labels.numel(), logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    step = chunk_rows or _chunk_rows(n, v)
    for (rows, block), (_, grad_block) in zip(row_chunks(logits, step), row_chunks(grad_out, step)):
        x = block.to(acc) / temperature
        lab = labels[rows]
        keep_b = lab != ignore_index
        keep = keep_b.to(acc)
        safe = torch.where(keep_b, lab, torch.zeros_like(lab))
        log_p = x - lse[rows].to(acc).unsqueeze(-1)
        p = log_p.exp()
        g = grad_logp[rows].to(acc) * keep
        grad = -p * g.unsqueeze(-1)
        grad.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
        if grad_entropy is not None:
            ge = grad_entropy[rows].to(acc) * keep
            grad -= p * (finite_logp(log_p) + entropy[rows].to(acc).unsqueeze(-1)) * ge.unsqueeze(-1)
        # exact zeros on ignored rows, whatever their logits hold
        grad_block.copy_((grad / temperature).masked_fill_(~keep_b.unsqueeze(-1), 0.0))
    return grad_out
