"""Vocabulary-parallel log-probs: logits sharded over the vocabulary across a process group.

Convention (DESIGN.md section 4, "Vocabulary parallel"): rank r of ``group`` holds the
contiguous shard ``logits[..., o_r : o_r + V_r]`` of the full ``[..., V]`` logits, shards in
rank order, sizes possibly different (``V = sum_r V_r``; the offsets ``o_r`` come from one
all-gather of the shard sizes per call). Labels are global ids in ``[0, V)`` (or
``ignore_index``), identical on every rank; outputs are identical on every rank; each rank's
gradient is exactly its slice of the unsharded gradient (not scaled by the world size).

Forward, per row, with ``x = z / tau`` on the local shard (stats in fp32, fp64 for fp64):

    m_r = max_j x_j,   s_r = sum_j e^(x_j - m_r),   t_r = sum_j e^(x_j - m_r) (x_j - m_r)
    M   = all_reduce_MAX(m_r)                                   all-reduce 1: [N]
    s'_r = e^(m_r - M) s_r,   t'_r = e^(m_r - M) (t_r + (m_r - M) s_r)     (rebased on M)
    S, T, x_y = all_reduce_SUM([s'_r, t'_r, owner_r * x_y])     all-reduce 2: [3, N]
    lse = M + log S,   logp = x_y - lse,   H = -sum_j p_j log p_j = log S - T / S

so one call costs one all-gather of sizes and two all-reduces of ``[N]`` / ``[3, N]`` row
statistics, never anything vocabulary-sized. The label's logit comes from the one rank whose
shard holds it (the others add 0). -inf logits contribute exactly 0 to s and t (0 log 0 = 0);
a NaN anywhere in a kept row makes s, hence the row's outputs, NaN on every rank.

Backward, per row and local column j, with ``p_j = e^(x_j - lse)`` (lse and H saved):

    dL/dz_j = [g_logp (1[j = y] - p_j) - g_H p_j (log p_j + H)] / tau

which needs only the global lse and H: the backward communicates nothing (also for the
entropy term, whose global part is the scalar H of the row). Rows are processed
``chunk_rows`` at a time, so no fp32 copy of the whole shard exists.

First version: plain PyTorch ops (works on any device and backend the process group
supports, e.g. gloo on CPU, NCCL on CUDA), not a fused kernel; the all-gather of the shard
sizes synchronises the host once per call.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._validation import as_rows, check_label_range
from ..reference._dtypes import acc_dtype
from ..reference.sequence_logprobs import sequence_sum
from ..reference.token_logprobs import finite_logp, row_chunks

__all__ = [
    "check_vocab_parallel",
    "vocab_shard_range",
    "block_stats",
    "combine_stats",
    "block_grad",
    "VocabParallelTokenLogprobsFunction",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_sequence_logprobs",
]

_CHUNK_ELEMS = 1 << 22  # fp32 temporaries per chunk: 16 MiB


def check_vocab_parallel(process_group, backend: str) -> None:
    """``process_group`` must be an initialised ``torch.distributed`` group; the sharded path
    is the torch implementation, so only ``backend="auto"`` or ``"torch"`` is accepted."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}"
        )
    if backend not in ("auto", "torch"):
        raise ValueError(
            f"process_group (vocabulary parallel) runs the torch implementation: backend must be "
            f"'auto' or 'torch', got {backend!r}"
        )


def vocab_shard_range(local_vocab: int, group, device: torch.device) -> tuple[int, int]:
    """``(offset, V)``: this rank's first global vocabulary id and the global vocabulary size,
    from one all-gather of the shard sizes (in rank order)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    sizes = torch.cat(sizes).tolist()
    rank = dist.get_rank(group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def _chunk(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, min(max(n_rows, 1), _CHUNK_ELEMS // max(vocab, 1)))


def _ownership(labels: torch.Tensor, start: int, vocab: int, ignore_index: int):
    """(keep, own, local): kept rows, rows whose label lies in this shard, its local index (0 if not)."""
    keep = labels != ignore_index
    local = labels - start
    own = keep & (local >= 0) & (local < vocab)
    return keep, own, torch.where(own, local, torch.zeros_like(local))


def block_stats(x: torch.Tensor, own: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``[4, c]``: the per-row ``(m, s, t, x_y)`` of one chunk ``x = z / tau`` ``[c, V_r]`` of the
    local shard, already in the accumulation dtype (``own`` / ``local``: ``_ownership``'s rows of
    this chunk). Shared by the logits-level op and the vocabulary-parallel linear ops."""
    m = x.amax(-1)  # NaN propagates
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # an all -inf shard row
    d = x - m_safe.unsqueeze(-1)
    e = d.exp()
    t = torch.where(x == float("-inf"), torch.zeros_like(d), e * d).sum(-1)
    x_y = x.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    return torch.stack([m, e.sum(-1), t, torch.where(own, x_y, torch.zeros_like(x_y))])


def combine_stats(stats: torch.Tensor, keep: torch.Tensor, group):
    """``(logp, entropy, lse)`` ``[n]``, identical on every rank, from this rank's ``[4, n]``
    ``block_stats``: two all-reduces (MAX of ``[n]``, SUM of ``[3, n]``). Rows not in ``keep``
    give logp = entropy = 0 (their lse is whatever the stats give)."""
    m, s, t, x_y = stats.unbind(0)
    big = m.clone()
    dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    ninf = float("-inf")
    big = torch.where(big == ninf, torch.zeros_like(big), big)  # every shard -inf: lse = -inf
    scale = torch.where(m == ninf, torch.zeros_like(m), (m - big).exp())
    delta = torch.where(m == ninf, torch.zeros_like(m), m - big)
    sums = torch.stack([scale * s, scale * (t + delta * s), x_y])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    total, tsum, x_y = sums.unbind(0)
    log_total = total.log()
    lse = big + log_total
    entropy = log_total - tsum / total
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return torch.where(keep, x_y - lse, zero), torch.where(keep, entropy, zero), lse


def block_grad(x, lse, entropy, g_lp, g_h, own, local) -> torch.Tensor:
    """dL/dx ``[c, V_r]`` of one chunk ``x = z / tau`` (accumulation dtype; divide by tau for
    dL/dz) from the global ``lse`` / ``entropy`` ``[c]`` and the upstream ``g_lp`` ``[c]``,
    ``g_h`` ``[c]`` or None: ``g_lp (1[j = y] - p_j) - g_h p_j (log p_j + H)``. No communication."""
    log_p = x - lse.unsqueeze(-1)
    p = log_p.exp()
    grad = -p * g_lp.unsqueeze(-1)
    grad.scatter_add_(-1, local.unsqueeze(-1), torch.where(own, g_lp, torch.zeros_like(g_lp)).unsqueeze(-1))
    if g_h is not None:
        grad -= p * (finite_logp(log_p) + entropy.unsqueeze(-1)) * g_h.unsqueeze(-1)
    return grad


def _local_stats(logits, labels, temperature, ignore_index, start, chunk_rows):
    """Per-row (m, s, t, x_y) of the local shard, chunk by chunk (see the module docstring)."""
    n, v = labels.numel(), logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    stats = torch.zeros(4, n, dtype=acc, device=logits.device)
    _, own, local = _ownership(labels, start, v, ignore_index)
    for rows, block in row_chunks(logits, _chunk(n, v, chunk_rows)):
        stats[:, rows] = block_stats(block.to(acc) / temperature, own[rows], local[rows])
    return stats


class VocabParallelTokenLogprobsFunction(torch.autograd.Function):
    """``(logp [N], entropy [N])`` of a vocabulary shard ``[N, V_r]`` or ``[R, C, V_r]``;
    both differentiable; the backward writes this rank's shard gradient only."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, group, start, inplace_backward, chunk_rows):
        stats = _local_stats(logits, labels, temperature, ignore_index, start, chunk_rows)
        logp, entropy, lse = combine_stats(stats, labels != ignore_index, group)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, start, inplace_backward, chunk_rows)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, start, inplace, chunk_rows = ctx.args
        n, v = labels.numel(), logits.shape[-1]
        acc = lse.dtype
        keep, own, local = _ownership(labels, start, v, ignore_index)
        g_lp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(acc) * keep.to(acc)
        g_h = None if grad_entropy is None else grad_entropy.to(acc) * keep.to(acc)
        grad_out = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        step = _chunk(n, v, chunk_rows)
        for (rows, block), (_, grad_block) in zip(row_chunks(logits, step), row_chunks(grad_out, step)):
            x = block.to(acc) / temperature  # read before grad_block (maybe the same memory) is written
            grad = block_grad(x, lse[rows], entropy[rows], g_lp[rows], None if g_h is None else g_h[rows],
                              own[rows], local[rows])
            # exact zeros on ignored rows, whatever their logits hold
            grad_block.copy_((grad / temperature).masked_fill_(~keep[rows].unsqueeze(-1), 0.0))
        return grad_out, None, None, None, None, None, None, None


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,  # [..., V_r] this rank's shard, validated by the caller
    labels: torch.Tensor,  # [...] global ids, identical on every rank
    *,
    temperature: float,
    ignore_index: int,
    group,
    inplace_backward: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` shaped like ``labels``, fp32 (fp64 for fp64), identical on every rank.

    Raises ``ValueError`` (CPU; a device-side assert on CUDA, as the unsharded ops) for a label
    outside the global ``[0, V)`` before any compute; every rank sees the same labels, so every
    rank raises (no rank is left waiting in a collective).
    """
    start, total = vocab_shard_range(logits.shape[-1], group, logits.device)
    rows, flat = as_rows(logits, labels)
    check_label_range(flat, total, ignore_index)
    logp, entropy = VocabParallelTokenLogprobsFunction.apply(
        rows, flat, float(temperature), int(ignore_index), group, start, bool(inplace_backward), chunk_rows
    )
    return logp.view(labels.shape), entropy.view(labels.shape)


def vocab_parallel_sequence_logprobs(
    logits: torch.Tensor,  # [B, T, V_r]
    labels: torch.Tensor,  # [B, T]
    *,
    temperature: float,
    ignore_index: int,
    average: bool,
    group,
    inplace_backward: bool = False,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``[B]``: the masked sum (mean if ``average``) over T of the sharded token log-probs, by the
    same float64 tree sum as the unsharded op (``fastpo.reference.sequence_logprobs``)."""
    logp, _ = vocab_parallel_token_logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index, group=group,
        inplace_backward=inplace_backward, chunk_rows=chunk_rows,
    )
    return sequence_sum(logp, labels, ignore_index, average)
