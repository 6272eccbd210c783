"""Benchmark cases for token_logprobs: forward + backward of the per-token log-prob.

Compared: the naive ``log_softmax -> gather`` (what most trainers write), TRL's
``selective_log_softmax`` when trl is installed, and each fastpo backend (plus
its in-place backward). Byte model (floor): read the logits once and write the
gradient once, 2 * N * V * itemsize; fastpo's kernels move 3 * N * V * itemsize
(the backward reads the logits again), so the floor GB/s is a lower bound on
the bandwidth they actually reach.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator

import torch

import fastpo
from fastpo.ops import registry

from . import Case, floor_bytes

OP = "token_logprobs"


def default_shapes(device: torch.device) -> list[tuple[int, int, torch.dtype]]:
    if device.type == "cuda":
        return [(16384, 128256, torch.bfloat16), (16384, 151936, torch.bfloat16), (16384, 128256, torch.float32)]
    return [(2048, 32000, torch.float32), (2048, 32000, torch.bfloat16)]


def _naive(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _trl_fn():
    if importlib.util.find_spec("trl") is None:
        return None
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # trl present but broken in this environment
        return None
    return lambda logits, labels: selective_log_softmax(logits, labels.clamp_min(0)) * (labels != -100)


def _step(fn, logits: torch.Tensor, labels: torch.Tensor, upstream: torch.Tensor):
    def step():
        logp = fn(logits, labels)
        (grad,) = torch.autograd.grad(logp, logits, upstream)
        return grad

    return step


def cases(device: torch.device, shapes=None) -> Iterator[Case]:
    interpreting = device.type == "cpu"
    for n, v, dtype in shapes or default_shapes(device):
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(n, v, generator=gen) * 2).to(dtype).to(device).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=gen).to(device)
        upstream = torch.randn(n, generator=gen).to(device)
        floor = floor_bytes(int((labels != -100).sum()), n, v, logits.element_size())
        common = dict(op=OP, dtype=str(dtype).replace("torch.", ""), shape=f"{n}x{v}", floor_bytes=floor)
        yield Case(impl="torch-naive", step=_step(_naive, logits, labels, upstream), **common)
        trl = _trl_fn()
        if trl is not None:
            yield Case(impl="trl-selective_log_softmax", step=_step(trl, logits, labels, upstream), **common)
        for backend in registry.backends_for(OP, device):
            fwd = lambda z, y, b=backend: fastpo.token_logprobs(z, y, backend=b)  # noqa: E731
            if backend == "triton" and interpreting:
                # the interpreter is a correctness path: time a slice of rows, say so
                k = min(n, 32)
                sliced = logits.detach()[:k].clone().requires_grad_()
                yield Case(
                    impl="fastpo[triton]", step=_step(fwd, sliced, labels[:k], upstream[:k]), reps=1,
                    note="Triton interpreter (CPU): correctness path, not a speed result",
                    **{**common, "shape": f"{k}x{v}", "floor_bytes": 2 * k * v * logits.element_size()},
                )
                continue
            yield Case(impl=f"fastpo[{backend}]", step=_step(fwd, logits, labels, upstream), **common)
            # in place: the gradient overwrites a scratch copy of the logits each call
            scratch = logits.detach().clone().requires_grad_()
            inplace = lambda z, y, b=backend: fastpo.token_logprobs(z, y, backend=b, inplace_backward=True)  # noqa: E731
            yield Case(impl=f"fastpo[{backend}] inplace", step=_step(inplace, scratch, labels, upstream), **common)
