"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo, as the README's FSDP2 note
uses it: two ranks, each with half of a global batch and its loss divided by the *global* count,
times the world size (FSDP2 averages the reduce-scattered gradients over the ranks). The
gathered gradients must equal the 1-process gradient on the whole batch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from test_vocab_parallel import _launch  # the shared spawn harness

fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD, ROWS = 2, 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _batch():
    return torch.randn(ROWS, 8, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        fsdp.fully_shard(model[0], mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
        part = _batch().chunk(world)[rank]
        (model(part).pow(2).sum() / ROWS * world).backward()  # global count; times world: FSDP averages
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, out)
        dist.barrier()  # no rank tears gloo down while its peer still communicates
    finally:
        dist.destroy_process_group()


def test_fsdp2_gloo_gradient_equals_one_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    _launch(_worker, WORLD, tmp_path, out)
    ref = copy.deepcopy(_model())
    (ref(_batch()).pow(2).sum() / ROWS).backward()
    grads = torch.load(out)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
