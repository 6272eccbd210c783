"""Benchmark cases for dpo_loss (sigmoid DPO): forward + backward, time and peak extra memory.

Two groups, both with precomputed reference log-probs (their cost is left out of every impl):

* from logits ``[2B, T, V]``: the naive PyTorch DPO most trainers write
  (``log_softmax -> gather -> masked sum -> -logsigmoid``) against each fastpo
  backend, out of place and with ``inplace_backward``. Byte model (floor): read the
  logits once and write the gradient once, ``2 * N * V * itemsize`` with N = 2B * T;
  fastpo moves ``3 * N * V * itemsize`` (the backward reads the logits again).
* from hidden states ``[2B, T, H]`` and the lm_head weight ``[V, H]``, because
  Liger's ``LigerFusedLinearDPOLoss`` only takes those (it never builds the logits):
  naive linear + naive DPO, Liger (``use_ref_model=False``: the same no-reference
  work as the others; ``compiled`` only on CUDA, torch.compile on CPU costs ~20 s),
  and linear + fastpo.dpo_loss (in place: the matmul's output buffer becomes its own
  gradient). These are matmul-bound; their floor GB/s uses the same logits byte model
  only so the rows line up.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator

import torch
import torch.nn.functional as F

from fastpo.functional.dpo_loss import dpo_loss
from fastpo.ops import registry

from . import Case, floor_bytes

OP = "dpo_loss"
BETA = 0.1
INTERPRETER_NOTE = "Triton interpreter (CPU): correctness path, not a speed result"


def default_shapes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    """(pairs B, T, V, dtype): logits are [2B, T, V]."""
    if device.type == "cuda":
        return [(8, 1024, 128256, torch.bfloat16), (8, 1024, 151936, torch.bfloat16), (8, 1024, 128256, torch.float32)]
    return [(4, 256, 32000, torch.float32), (4, 256, 32000, torch.bfloat16)]


def _as_pairs(shape) -> tuple[int, int, int, torch.dtype]:
    """Accept (B, T, V, dtype), or the CLI's (rows N, V, dtype) read as 2B sequences of T <= 256."""
    if len(shape) == 4:
        return shape
    n, v, dtype = shape
    t = max(1, min(256, n // 2))
    return max(1, n // (2 * t)), t, v, dtype


def naive_dpo(logits, labels, ref_c, ref_r):
    """log_softmax -> gather -> masked sum -> sigmoid DPO, in float32 (what most trainers write)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    chosen, rejected = tok.sum(-1).chunk(2)
    return -F.logsigmoid(BETA * ((chosen - ref_c) - (rejected - ref_r))).mean()


def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception:  # installed but unusable here
        return None
    return LigerFusedLinearDPOLoss


def _step(loss_fn, leaves):
    def step():
        return torch.autograd.grad(loss_fn(), leaves)

    return step


def _batch(pairs, t, v, dtype, device, hidden=None):
    gen = torch.Generator().manual_seed(0)
    rows = 2 * pairs
    labels = torch.randint(0, v, (rows, t), generator=gen)
    labels[:, : t // 4] = -100  # prompt
    ref = -torch.rand(rows, generator=gen) * t
    if hidden is None:
        x = (torch.randn(rows, t, v, generator=gen) * 2).to(dtype)
    else:
        x = torch.randn(rows, t, hidden, generator=gen).to(dtype)
    return x.to(device).requires_grad_(), labels.to(device), ref[:pairs].to(device), ref[pairs:].to(device)


def _from_logits(pairs, t, v, dtype, device) -> Iterator[Case]:
    logits, labels, ref_c, ref_r = _batch(pairs, t, v, dtype, device)
    common = dict(op=OP, dtype=str(dtype).replace("torch.", ""), shape=f"{2 * pairs}x{t}x{v}",
                  floor_bytes=floor_bytes(int((labels != -100).sum()), 2 * pairs * t, v, logits.element_size()))
    yield Case(impl="torch-naive", step=_step(lambda: naive_dpo(logits, labels, ref_c, ref_r), [logits]), **common)
    for backend in registry.backends_for("sequence_logprobs", device):
        def fused(z=logits, y=labels, b=backend, inplace=False):
            return dpo_loss(z, y, ref_c, ref_r, beta=BETA, backend=b, inplace_backward=inplace).loss

        if backend == "triton" and device.type == "cpu":
            # the interpreter is a correctness path: time one pair's last 16 tokens, say so
            k = min(t, 16)
            sub = logits.detach()[[0, pairs], -k:].clone().requires_grad_()
            sub_labels = labels[[0, pairs], -k:]

            def sliced(z=sub, y=sub_labels, b=backend):
                return dpo_loss(z, y, ref_c[:1], ref_r[:1], beta=BETA, backend=b).loss

            yield Case(
                impl="fastpo[triton]", step=_step(sliced, [sub]), reps=1, note=INTERPRETER_NOTE,
                **{**common, "shape": f"2x{k}x{v}", "floor_bytes": 2 * 2 * k * v * logits.element_size()},
            )
            continue
        yield Case(impl=f"fastpo[{backend}]", step=_step(fused, [logits]), **common)
        scratch = logits.detach().clone().requires_grad_()  # overwritten by the gradient on every call

        def fused_inplace(s=scratch, b=backend):
            return fused(s, labels, b, True)

        yield Case(impl=f"fastpo[{backend}] inplace", step=_step(fused_inplace, [scratch]), **common)


def _from_hidden(pairs, t, v, dtype, device, hidden) -> Iterator[Case]:
    h, labels, ref_c, ref_r = _batch(pairs, t, v, dtype, device, hidden=hidden)
    weight = (torch.randn(v, hidden, generator=torch.Generator().manual_seed(1)) / hidden**0.5).to(dtype)
    weight = weight.to(device).requires_grad_()
    common = dict(op=OP, dtype=str(dtype).replace("torch.", ""), shape=f"{2 * pairs}x{t}x{v} H={hidden}",
                  floor_bytes=floor_bytes(int((labels != -100).sum()), 2 * pairs * t, v, h.element_size()), note="lm_head + DPO (matmul-bound)")
    leaves = [h, weight]
    yield Case(impl="linear+torch-naive", step=_step(lambda: naive_dpo(h @ weight.T, labels, ref_c, ref_r), leaves),
               **common)
    liger_cls = _liger()
    if liger_cls is not None:
        liger = liger_cls(beta=BETA, compiled=device.type == "cuda", use_ref_model=False)
        yield Case(impl="liger-fused-linear-dpo", step=_step(lambda: liger(weight, h, labels)[0], leaves), **common)
    backend = registry.resolve("sequence_logprobs", "auto", device)

    def linear_fastpo():
        return dpo_loss(h @ weight.T, labels, ref_c, ref_r, beta=BETA, backend=backend, inplace_backward=True).loss

    yield Case(impl=f"linear+fastpo[{backend}] inplace", step=_step(linear_fastpo, leaves), **common)


def cases(device: torch.device, shapes=None) -> Iterator[Case]:
    for shape in shapes or default_shapes(device):
        pairs, t, v, dtype = _as_pairs(shape)
        yield from _from_logits(pairs, t, v, dtype, device)
    if shapes is None:  # the linear group runs at the first default shape
        pairs, t, v, dtype = default_shapes(device)[0]
        hidden = 4096 if device.type == "cuda" else 256
        yield from _from_hidden(pairs, t, v, dtype, device, hidden)
