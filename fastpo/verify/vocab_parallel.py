"""Verify cases for the vocabulary-parallel ops: 2 CPU processes over gloo, uneven shards of
V = 4099 (1500 / 2599), sharded ``token_logprobs`` and ``linear_token_logprobs`` against the
unsharded op (values, entropy, the rank's gradient slice, and for the linear op the full
dL/dhidden every rank holds). Each worker writes its errors to a file; the worst over the
ranks is reported. A worker that fails gives one failing check."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterator

import torch

from . import Check, rel_err

SIZES = (1500, 2599)
OP = "vocab_parallel"


def _errors(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    import fastpo

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        n, h, v = 24, 16, sum(SIZES)
        lo = sum(SIZES[:rank])
        full = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
        labels = torch.randint(0, v, (n,), generator=g)
        labels[::5] = -100
        up = torch.randn(n, generator=g, dtype=torch.float64)
        hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
        weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 3
        errs = {}
        for dtype in (torch.float32, torch.float64):
            name = str(dtype).replace("torch.", "")
            x = full.to(dtype).requires_grad_()
            lp, ent = fastpo.token_logprobs(x, labels, return_entropy=True, temperature=0.9, backend="torch")
            (gx,) = torch.autograd.grad((lp * up.to(lp.dtype)).sum() + ent.sum(), x)
            xs = full[:, lo:lo + SIZES[rank]].to(dtype).clone().requires_grad_()
            lps, ents = fastpo.token_logprobs(xs, labels, return_entropy=True, temperature=0.9,
                                              process_group=dist.group.WORLD)
            (gs,) = torch.autograd.grad((lps * up.to(lps.dtype)).sum() + ents.sum(), xs)
            errs[f"token_logprobs {name} logp"] = rel_err(lps, lp)
            errs[f"token_logprobs {name} entropy"] = rel_err(ents, ent)
            errs[f"token_logprobs {name} grad slice"] = rel_err(gs, gx[:, lo:lo + SIZES[rank]])
            hd, wd = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
            lp1 = fastpo.linear_token_logprobs(hd, wd, labels, temperature=0.9, backend="torch")
            gh, gw = torch.autograd.grad((lp1 * up.to(lp1.dtype)).sum(), (hd, wd))
            hs = hidden.to(dtype).requires_grad_()
            ws = weight[lo:lo + SIZES[rank]].to(dtype).clone().requires_grad_()
            lp2 = fastpo.linear_token_logprobs(hs, ws, labels, temperature=0.9, process_group=dist.group.WORLD)
            gh2, gw2 = torch.autograd.grad((lp2 * up.to(lp2.dtype)).sum(), (hs, ws))
            errs[f"linear_token_logprobs {name} logp"] = rel_err(lp2, lp1)
            errs[f"linear_token_logprobs {name} grad hidden"] = rel_err(gh2, gh)
            errs[f"linear_token_logprobs {name} grad weight slice"] = rel_err(gw2, gw[lo:lo + SIZES[rank]])
        with open(f"{out}.{rank}", "w") as f:
            json.dump(errs, f)
        dist.barrier()  # no rank tears gloo down while its peer still communicates
    finally:
        dist.destroy_process_group()
    # Done (errors written, group destroyed): leave without the interpreter's normal exit, whose
    # C++ static destructors now and then abort after a gloo run ("terminate called without an
    # active exception"), which would report a failed worker. An exception above propagates.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def checks(device: torch.device) -> Iterator[Check]:
    import torch.multiprocessing as mp

    if device.type != "cpu":
        return  # the gloo check runs on CPU; NCCL needs a multi-GPU machine
    world = len(SIZES)
    shape = f"24x{sum(SIZES)} ({'/'.join(map(str, SIZES))})"
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "errs")
        try:
            mp.start_processes(_errors, args=(world, store, out), nprocs=world, start_method="spawn")
            per_rank = [json.load(open(f"{out}.{r}")) for r in range(world)]
        except Exception as e:  # noqa: BLE001 (a worker failed: one failing check says so)
            yield Check(op=OP, backend="torch", dtype="-", shape=shape,
                        quantity=f"workers failed: {type(e).__name__}", error=float("nan"), tol=0.0)
            return
    for key, err in per_rank[0].items():
        op, dtype, quantity = key.split(" ", 2)
        worst = max(p[key] for p in per_rank)
        tol = 1e-10 if dtype == "float64" else 1e-5
        yield Check(op=f"{op} (gloo x{world})", backend="torch", dtype=dtype, shape=shape, quantity=quantity,
                    error=worst, tol=tol)
