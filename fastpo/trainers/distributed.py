"""Data parallel for the trainers: the same script under ``torchrun --nproc_per_node N``.

Every rank holds the whole model and draws the same global batch (same seeded generator); each
takes its contiguous share of the rows (whole GRPO groups), divides its loss by the *global*
token / sequence / pair count (all-reduced, passed to fastpo's ``num_tokens`` /
``num_sequences``), and the gradients are summed over the ranks after ``backward`` — so every
rank takes the step the single process takes on the global batch. Gradients are all-reduced
by hand rather than by ``torch.nn.parallel.DistributedDataParallel``: the losses bypass the
model's ``forward`` (trunk, then the head through fastpo's linear ops), where DDP hooks in.
Only rank 0 evaluates and writes files. Single process: every function here is the identity
(no collective, the counts stay None so the ops keep their own normalisers).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


_JOINED = False  # this module initialised the process group (so shutdown() tears it down)


def init_from_env() -> torch.device | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment): nccl
    with one GPU per local rank, else gloo on CPU. Returns the rank's device; on a group that is
    already initialised (a later stage of ``train all``, or the caller's own group) the device
    of its backend; None when not distributed."""
    global _JOINED
    if dist.is_available() and dist.is_initialized():
        return _comm_device()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    _JOINED = True
    return device


def shutdown(barrier: bool = True) -> None:
    """Leave the process group ``init_from_env`` joined: a barrier (no rank tears the group down
    while a peer still communicates; skipped with ``barrier=False``, on an error path where the
    peers may never reach it), then ``destroy_process_group``. A process that exits with
    a live gloo group can abort in its C++ teardown ("terminate called without an active
    exception"), which torchrun reports as a failed rank. A no-op for a group the caller owns."""
    global _JOINED
    if _JOINED and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _JOINED = False


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a (detached) tensor, on ``x``'s device; ``x`` itself in a single
    process."""
    if world()[1] == 1:
        return x
    y = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def global_count(local: torch.Tensor | int) -> torch.Tensor | int | None:
    """The all-reduced count for ``num_tokens`` / ``num_sequences`` (a tensor for a tensor, an
    int for an int); None in a single process (the op's own count is the global one)."""
    if world()[1] == 1:
        return None
    if not isinstance(local, torch.Tensor):
        return int(all_sum(torch.tensor(int(local))).item())
    return all_sum(local)


def weighted_mean(values: dict, weight: torch.Tensor) -> dict:
    """Per-rank means (0-dim tensors) -> the global mean, weighting each rank by ``weight``
    (its number of tokens or rows); unchanged in a single process."""
    if world()[1] == 1:
        return values
    keys = list(values)
    w = weight.detach().float().reshape(1).to(values[keys[0]].device)
    packed = all_sum(torch.cat([torch.stack([values[k].detach().float().reshape(()) for k in keys]) * w, w]))
    return dict(zip(keys, (packed[:-1] / packed[-1].clamp_min(1)).unbind(0)))


def all_reduce_grads(params) -> None:
    """Sum every parameter's gradient over the ranks, in one flat all-reduce (a parameter
    without a gradient on this rank counts as zero)."""
    if world()[1] == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def local_shards(data_shards: int | None, rows: int, what: str) -> range:
    """The shard indices (of ``data_shards``, default the world size) this rank owns; checks
    that ``rows`` splits evenly."""
    rank, size = world()
    shards = data_shards or size
    if shards % size:
        raise ValueError(f"data_shards={shards} must be a multiple of the world size {size}")
    if rows % shards:
        raise ValueError(f"{what}={rows} must split evenly into {shards} data shards (one per rank)")
    per_rank = shards // size
    return range(rank * per_rank, (rank + 1) * per_rank)


def shard_rows(items, shards: int, index: int):
    """The ``index``-th of ``shards`` equal contiguous parts of ``items``."""
    n = len(items) // shards
    return items[index * n:(index + 1) * n]


def global_mean(x: torch.Tensor) -> float:
    """Mean of ``x``'s elements over all ranks."""
    if world()[1] == 1:
        return x.mean().item()
    n, total = all_sum(torch.stack([torch.tensor(float(x.numel()), device=x.device), x.sum().float()])).tolist()
    return total / n


def global_mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (n - 1) standard deviation of ``x``'s elements over all ranks."""
    if world()[1] == 1:
        return x.mean().item(), x.std().item()
    n, total, squares = all_sum(torch.stack([torch.tensor(float(x.numel()), device=x.device), x.sum().float(),
                                             x.float().pow(2).sum()])).tolist()
    mean = total / n
    return mean, max(0.0, (squares - n * mean * mean) / max(1.0, n - 1)) ** 0.5


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``fastpo.whiten(x, mask)`` with the mean and (n - 1) variance over every rank's masked
    elements (two all-reduces); ``fastpo.whiten`` itself in a single process."""
    import fastpo

    if world()[1] == 1:
        return fastpo.whiten(x, mask)
    m = mask.to(x.dtype)
    n, total = all_sum(torch.stack([m.sum(), (x * m).sum()])).unbind(0)
    mean = total / n.clamp_min(1)
    var = all_sum(((x - mean).pow(2) * m).sum()) / (n - 1).clamp_min(1)
    return (x - mean) * torch.rsqrt(var + eps) * m
