"""Benchmark cases for the fused lm_head ops: ``linear_token_logprobs`` and ``linear_policy_loss``.

Every case is one forward + backward from hidden states ``[N, H]`` (``[B, T, H]`` for the
policy loss, N = B * T) and the lm_head ``[V, H]``, returning the gradients of hidden and weight:

  torch-naive          ``hidden @ W.T -> log_softmax (fp32) -> gather`` (plus, for the policy
                       loss, the same GRPO-style elementwise loss as ``policy_loss.py``:
                       ``_surrogate_kl_mean``, ppo clip 0.2 / 0.28, k3 KL 0.04, token-mean), autograd;
                       it materialises the ``N x V`` logits and their fp32 copies
  fastpo[b]            ``fastpo.linear_token_logprobs`` / ``fastpo.linear_policy_loss`` on every
                       backend of ``registry.backends_for("token_logprobs", device)``; on CPU the
                       Triton backend is the interpreter: it runs a few rows only, marked with
                       INTERPRETER_NOTE (a correctness path, not a speed result)
  trl-chunked-logprob  TRL's ``_ChunkedLogProbFunction`` (``trl.trainer.utils``, TRL >= 1.16; its
                       default vocabulary chunk 32768, no optional outputs), plus
                       ``_surrogate_kl_mean`` for the policy loss
  liger-...            Liger's chunked selective log-prob (``fused_linear_ppo._ChunkedSelectiveLogProbFunction``)
                       for the token case, ``LigerFusedLinearGRPOLoss`` (``loss_type="dapo"``: token
                       mean, same clip / KL config; ``compiled`` only on CUDA) for the policy loss
  torch-matmul-3gemm   for reference only: ``hidden @ W.T``, ``dz @ W`` and ``dz.T @ hidden`` at the
                       same shapes, so a reader sees the share of each impl spent outside the GEMMs
Peers are optional imports, skipped silently when absent or unusable.

Byte model (floor): there is no ``N x V`` traffic in the fused design, so the floor is "read
hidden and weight once, write dhidden and dweight once": ``2 * (N + V) * H * itemsize``. These
ops are GEMM-bound; ``note`` carries the FLOP count of the op's fused design (6 N H V for the
3-GEMM policy path, 8 N H V for the token path, whose backward recomputes the logits), so
GFLOP/s = that count / median time.

``shapes``: a list of ``(N, H, V, dtype)``, or the CLI's ``(N, V, dtype)`` (H then defaults to
1024 on CPU, 4096 on CUDA). The policy loss splits N as ``B x 256`` when 256 divides it, else
``1 x N``. CPU default: N = 2048, H = 1024, V = 32000, fp32 and bf16, the shape of issue 10's
targets (about 10 minutes for the whole module on a 2-core machine; N = 8192 through
``--shapes 8192x32000xfloat32,8192x32000xbfloat16``).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Iterator

import torch

import fastpo
from fastpo.ops import registry

from . import Case
from .policy_loss import CONFIG, _surrogate_kl_mean

OPS = ("linear_token_logprobs", "linear_policy_loss")
BACKEND_OP = "token_logprobs"
INTERPRETER_NOTE = "Triton interpreter (CPU): correctness path, not a speed result"
INTERPRETER_ROWS = 8


def default_shapes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    """(N, H, V, dtype)."""
    if device.type == "cuda":
        return [(8192, 4096, 128256, torch.bfloat16), (8192, 4096, 151936, torch.bfloat16),
                (8192, 4096, 128256, torch.float32)]
    return [(2048, 1024, 32000, torch.float32), (2048, 1024, 32000, torch.bfloat16)]


def _as_nhv(shape, device) -> tuple[int, int, int, torch.dtype]:
    if len(shape) == 4:
        return tuple(shape)
    n, v, dtype = shape
    return n, 4096 if device.type == "cuda" else 1024, v, dtype


def _bt(n: int) -> tuple[int, int]:
    return (n // 256, 256) if n % 256 == 0 and n >= 256 else (1, n)


def floor_bytes(n: int, h: int, v: int, itemsize: int) -> int:
    """Read hidden + weight once, write dhidden + dweight once."""
    return 2 * (n + v) * h * itemsize


# ----------------------------------------------------------------------------- peers
def _trl():
    if importlib.util.find_spec("trl") is None:
        return None
    try:
        from trl.trainer.utils import _ChunkedLogProbFunction
    except Exception:  # absent in this trl version, or trl broken here
        return None

    def logprobs(h2, weight, targets):
        return _ChunkedLogProbFunction.apply(h2, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]

    return logprobs


def _liger_logprob():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import (
            _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE, _ChunkedSelectiveLogProbFunction)
    except Exception:
        return None
    return lambda h2, weight, targets: _ChunkedSelectiveLogProbFunction.apply(
        h2, weight, targets, None, 1.0, _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE)


def _liger_grpo(device):
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception:
        return None
    return LigerFusedLinearGRPOLoss(beta=CONFIG.kl_coef, compiled=device.type == "cuda", use_ref_model=True,
                                    epsilon_low=CONFIG.clip_low, epsilon_high=CONFIG.clip_high, loss_type="dapo")


# ----------------------------------------------------------------------------- cases
def _step(loss_fn, leaves):
    def step():
        return torch.autograd.grad(loss_fn(), leaves)

    return step


def _naive_logp(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def _head(n, h, v, dtype, device):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, labels


def _matmul_case(hidden, weight, **common) -> Case:
    dz = torch.randn(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    h, w = hidden.detach(), weight.detach()

    def step():
        return h @ w.T, dz @ w, dz.T @ h

    return Case(impl="torch-matmul-3gemm", step=step,
                **{**common, "note": "reference: the 3 GEMMs alone (dz precomputed), no softmax"})


def _token_cases(n, h, v, dtype, device) -> Iterator[Case]:
    op = "linear_token_logprobs"
    hidden, weight, labels = _head(n, h, v, dtype, device)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device)
    leaves = [hidden, weight]
    gflop = 8 * n * h * v / 1e9
    common = dict(op=op, dtype=str(dtype).replace("torch.", ""), shape=f"{n}x{h}x{v}",
                  floor_bytes=floor_bytes(n, h, v, hidden.element_size()), note=f"8NHV={gflop:.1f} GFLOP")

    def weighted(fn, hs=hidden, ys=labels, up=upstream):
        return lambda: (fn(hs, weight, ys).float() * up).sum()

    yield Case(impl="torch-naive", step=_step(weighted(_naive_logp), leaves), **common)
    for backend in registry.backends_for(BACKEND_OP, device):
        fused = lambda hs, w, ys, b=backend: fastpo.linear_token_logprobs(hs, w, ys, backend=b)  # noqa: E731
        if backend == "triton" and device.type == "cpu":
            k = min(n, INTERPRETER_ROWS)
            sub = hidden.detach()[:k].clone().requires_grad_()
            yield Case(impl="fastpo[triton]", step=_step(weighted(fused, sub, labels[:k], upstream[:k]), [sub, weight]),
                       reps=1, **{**common, "shape": f"{k}x{h}x{v}", "floor_bytes": floor_bytes(k, h, v, hidden.element_size()),
                                  "note": INTERPRETER_NOTE})
            continue
        yield Case(impl=f"fastpo[{backend}]", step=_step(weighted(fused), leaves), **common)
    for name, fn in (("trl-chunked-logprob", _trl()), ("liger-chunked-selective-logprob", _liger_logprob())):
        if fn is not None:
            yield Case(impl=name, step=_step(weighted(fn), leaves), **common)
    yield _matmul_case(hidden, weight, **common)


def _policy_inputs(b, t, v, device):
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(b, t, generator=gen) > 0.1).to(device)
    old = -math.log(v) - 1 + 0.3 * torch.randn(b, t, generator=gen)
    ref = old + 0.1 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    return old.to(device), adv.to(device), ref.to(device), mask


def _policy_cases(n, h, v, dtype, device) -> Iterator[Case]:
    op = "linear_policy_loss"
    b, t = _bt(n)
    hidden2, weight, labels2 = _head(n, h, v, dtype, device)
    hidden = hidden2.detach().view(b, t, h).requires_grad_()
    labels = labels2.view(b, t)
    old, adv, ref, mask = _policy_inputs(b, t, v, device)
    leaves = [hidden, weight]
    gflop = 6 * n * h * v / 1e9
    common = dict(op=op, dtype=str(dtype).replace("torch.", ""), shape=f"{b}x{t}x{h}x{v}",
                  floor_bytes=floor_bytes(n, h, v, hidden.element_size()), note=f"6NHV={gflop:.1f} GFLOP")

    def naive():
        logp = _naive_logp(hidden, weight, labels)
        return _surrogate_kl_mean(logp, old, adv, ref, mask)

    yield Case(impl="torch-naive", step=_step(naive, leaves), **common)
    for backend in registry.backends_for(BACKEND_OP, device):
        def fused(hs=hidden, ys=labels, o=old, a=adv, r=ref, m=mask, bk=backend):
            return fastpo.linear_policy_loss(hs, weight, ys, o, a, mask=m, ref_logprobs=r, config=CONFIG,
                                             backend=bk).loss

        if backend == "triton" and device.type == "cpu":
            k = min(t, INTERPRETER_ROWS)
            sub = hidden.detach()[:1, :k].clone().requires_grad_()
            sliced = lambda: fused(sub, labels[:1, :k], old[:1, :k], adv[:1], ref[:1, :k], mask[:1, :k])  # noqa: E731
            yield Case(impl="fastpo[triton]", step=_step(sliced, [sub, weight]), reps=1,
                       **{**common, "shape": f"1x{k}x{h}x{v}", "floor_bytes": floor_bytes(k, h, v, hidden.element_size()),
                          "note": INTERPRETER_NOTE})
            continue
        yield Case(impl=f"fastpo[{backend}]", step=_step(fused, leaves), **common)
    trl = _trl()
    if trl is not None:
        def trl_loss():
            logp = trl(hidden.view(n, h), weight, labels.reshape(n)).view(b, t).float()
            return _surrogate_kl_mean(logp, old, adv, ref, mask)

        yield Case(impl="trl-chunked-logprob+loss", step=_step(trl_loss, leaves), **common)
    liger = _liger_grpo(device)
    if liger is not None:
        yield Case(impl="liger-fused-linear-grpo",
                   step=_step(lambda: liger(hidden, weight, labels, mask.long(), adv, ref_per_token_logps=ref,
                                            old_per_token_logps=old)[0], leaves), **common)
    yield _matmul_case(hidden2, weight, **common)


def cases(device: torch.device, shapes=None) -> Iterator[Case]:
    for shape in shapes or default_shapes(device):
        n, h, v, dtype = _as_nhv(shape, device)
        yield from _token_cases(n, h, v, dtype, device)
        yield from _policy_cases(n, h, v, dtype, device)
