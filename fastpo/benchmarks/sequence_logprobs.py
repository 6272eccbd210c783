"""Benchmark cases for sequence_logprobs: forward + backward of the masked per-sequence sum.

Compared: the naive ``log_softmax -> gather -> masked sum`` and each fastpo backend
(plus its in-place backward). Byte model (floor): read the logits once and write the
gradient once, ``2 * B * T * V * itemsize``; fastpo moves 3x that (the backward reads
the logits again), so the floor GB/s is a lower bound on what it reaches.
"""
from __future__ import annotations

from typing import Iterator

import torch

from fastpo.functional.sequence_logprobs import sequence_logprobs
from fastpo.ops import registry

from . import Case, floor_bytes

OP = "sequence_logprobs"


def default_shapes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, T, V, dtype)."""
    if device.type == "cuda":
        return [(16, 1024, 128256, torch.bfloat16), (16, 1024, 151936, torch.bfloat16)]
    return [(8, 256, 32000, torch.float32)]


def _as_sequences(shape) -> tuple[int, int, int, torch.dtype]:
    """Accept (B, T, V, dtype), or the CLI's (rows N, V, dtype) read as sequences of T <= 256."""
    if len(shape) == 4:
        return shape
    n, v, dtype = shape
    t = max(1, min(256, n))
    return max(1, n // t), t, v, dtype


def naive_sequence_logprobs(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(-1)


def _step(fn, logits, upstream):
    def step():
        return torch.autograd.grad(fn(logits), logits, upstream)

    return step


def cases(device: torch.device, shapes=None) -> Iterator[Case]:
    for shape in shapes or default_shapes(device):
        b, t, v, dtype = _as_sequences(shape)
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(b, t, v, generator=gen) * 2).to(dtype).to(device).requires_grad_()
        labels = torch.randint(0, v, (b, t), generator=gen)
        labels[:, : t // 4] = -100  # prompt
        labels = labels.to(device)
        upstream = torch.randn(b, generator=gen).to(device)
        common = dict(op=OP, dtype=str(dtype).replace("torch.", ""), shape=f"{b}x{t}x{v}",
                      floor_bytes=floor_bytes(int((labels != -100).sum()), b * t, v, logits.element_size()))
        yield Case(impl="torch-naive", step=_step(lambda z: naive_sequence_logprobs(z, labels), logits, upstream),
                   **common)
        for backend in registry.backends_for(OP, device):
            if backend == "triton" and device.type == "cpu":
                # the interpreter is a correctness path: time one sequence's last 16 tokens, say so
                k = min(t, 16)
                sub = logits.detach()[:1, -k:].clone().requires_grad_()
                sub_labels = labels[:1, -k:].contiguous()
                yield Case(
                    impl="fastpo[triton]", reps=1,
                    step=_step(lambda z, y=sub_labels: sequence_logprobs(z, y, backend="triton"), sub, upstream[:1]),
                    note="Triton interpreter (CPU): correctness path, not a speed result",
                    **{**common, "shape": f"1x{k}x{v}", "floor_bytes": 2 * k * v * logits.element_size()},
                )
                continue
            yield Case(impl=f"fastpo[{backend}]", step=_step(
                lambda z, b=backend: sequence_logprobs(z, labels, backend=b), logits, upstream), **common)
            scratch = logits.detach().clone().requires_grad_()  # overwritten by the gradient on every call
            yield Case(impl=f"fastpo[{backend}] inplace", step=_step(
                lambda z, b=backend: sequence_logprobs(z, labels, backend=b, inplace_backward=True), scratch, upstream),
                **common)
