"""Benchmark cases for the fused policy_loss: forward + backward from logits [B, T, V].

Compared, all on one GRPO-style config (ppo, clip 0.2 / 0.28, k3 KL with coefficient 0.04,
token-mean):
  torch-naive      log_softmax in fp32 over [B, T, V] -> gather -> ratio / clip / KL -> mean,
                   autograd (what most trainers write)
  trl-selective    TRL's ``selective_log_softmax`` + the same elementwise loss (if trl is installed)
  fastpo-composed  ``fastpo.token_logprobs`` + ``fastpo.policy_loss_from_logprobs`` ("auto" backend)
  fastpo[b]        ``fastpo.policy_loss`` on each backend b, and with ``inplace_backward=True``
  fastpo[b] is+klxr  the same with rollout IS weights (``policy_weights``) and TRL 1.16's default
                   KL x ratio (``kl_importance_weighted``), next to the plain one: the issue's
                   target is <= 1.1x its time (both features run inside the fused kernel)
Byte model (floor): read the logits once and write the gradient once, 2 * N * V * itemsize;
the fused kernels move 3 * N * V * itemsize (two reads, one write). The runner measures peak
extra memory: everything allocated during the step, including the returned gradient.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Iterator

import torch

import fastpo
from fastpo.config import PolicyLossConfig
from fastpo.ops import registry

from . import Case, floor_bytes

OP = "policy_loss"
BACKEND_OP = "token_logprobs"  # policy_loss runs on every backend that runs token_logprobs
CONFIG = PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.04, kl_estimator="k3")
CONFIG_IS = dataclasses.replace(CONFIG, kl_importance_weighted=True)


def default_shapes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, T, V, dtype)."""
    if device.type == "cuda":
        return [(16, 1024, 128256, torch.bfloat16), (16, 1024, 151936, torch.bfloat16),
                (8, 1024, 128256, torch.float32)]
    return [(8, 256, 32000, torch.float32), (8, 256, 32000, torch.bfloat16)]


def _as_btv(shape) -> tuple[int, int, int, torch.dtype]:
    """Accept (B, T, V, dtype) or the CLI's (N, V, dtype) (split as B x 256 when possible)."""
    if len(shape) == 4:
        return shape
    n, v, dtype = shape
    return (n // 256, 256, v, dtype) if n % 256 == 0 and n >= 256 else (1, n, v, dtype)


def _surrogate_kl_mean(logp, old, adv, ref, mask):
    """The elementwise GRPO loss on [B, T] log-probs, written the usual way."""
    ratio = torch.exp(logp - old)
    adv = adv.unsqueeze(-1)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CONFIG.clip_low, 1 + CONFIG.clip_high))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = (pg + CONFIG.kl_coef * kl) * mask
    return per_token.sum() / mask.sum().clamp(min=1)


def _naive(logits, labels, old, adv, ref, mask):
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _surrogate_kl_mean(logp, old, adv, ref, mask)


def _trl_fn():
    if importlib.util.find_spec("trl") is None:
        return None
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # trl present but broken in this environment
        return None

    def loss(logits, labels, old, adv, ref, mask):
        return _surrogate_kl_mean(selective_log_softmax(logits, labels.clamp_min(0)).float(), old, adv, ref, mask)

    return loss


def _composed(logits, labels, old, adv, ref, mask):
    logp = fastpo.token_logprobs(logits, labels, temperature=CONFIG.temperature)
    return fastpo.policy_loss_from_logprobs(logp, old, adv, mask, ref_logprobs=ref, config=CONFIG).loss


def _fused(backend: str, inplace: bool = False):
    def loss(logits, labels, old, adv, ref, mask):
        return fastpo.policy_loss(logits, labels, old, adv, mask=mask, ref_logprobs=ref, config=CONFIG,
                                  backend=backend, inplace_backward=inplace).loss

    return loss


def _fused_is(backend: str):
    def loss(logits, labels, old, adv, ref, mask):
        weights = torch.ones_like(old).mul_(0.9)  # stand-in truncated IS weights
        return fastpo.policy_loss(logits, labels, old, adv, mask=mask, ref_logprobs=ref, config=CONFIG_IS,
                                  policy_weights=weights, backend=backend).loss

    return loss


def _step(fn, logits, labels, old, adv, ref, mask):
    def step():
        loss = fn(logits, labels, old, adv, ref, mask)
        (grad,) = torch.autograd.grad(loss, logits)
        return grad

    return step


def _inputs(b, t, v, dtype, device):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, t, v, generator=gen) * 2).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen).to(device)
    mask = (torch.rand(b, t, generator=gen) > 0.1).to(device)
    # old / ref near the log-prob of a near-uniform row, so the ratios and the k3 term stay
    # moderate both for these logits and for the garbage the in-place cases leave behind
    old = -math.log(v) - 1 + 0.3 * torch.randn(b, t, generator=gen)
    ref = old + 0.1 * torch.randn(b, t, generator=gen)
    old, ref = old.to(device), ref.to(device)
    adv = torch.randn(b, generator=gen).to(device)
    return logits, labels, old, adv, ref, mask


def cases(device: torch.device, shapes=None) -> Iterator[Case]:
    interpreting = device.type == "cpu"
    for b, t, v, dtype in map(_as_btv, shapes or default_shapes(device)):
        logits, labels, old, adv, ref, mask = _inputs(b, t, v, dtype, device)
        args = (labels, old, adv, ref, mask)
        kept = int((mask & (labels != -100)).sum())
        floor = floor_bytes(kept, b * t, v, logits.element_size())
        common = dict(op=OP, dtype=str(dtype).replace("torch.", ""), shape=f"{b}x{t}x{v}", floor_bytes=floor)
        yield Case(impl="torch-naive", step=_step(_naive, logits, *args), **common)
        trl = _trl_fn()
        if trl is not None:
            yield Case(impl="trl-selective_log_softmax", step=_step(trl, logits, *args), **common)
        yield Case(impl="fastpo-composed", step=_step(_composed, logits, *args), **common)
        for backend in registry.backends_for(BACKEND_OP, device):
            if backend == "triton" and interpreting:
                # the interpreter is a correctness path: time a few rows, say so
                k = min(t, 8)
                sliced = logits.detach()[:1, :k].clone().requires_grad_()
                sliced_args = tuple(x[:1, :k] if x.dim() == 2 else x[:1] for x in args)
                yield Case(
                    impl="fastpo[triton]", step=_step(_fused("triton"), sliced, *sliced_args), reps=1,
                    note="Triton interpreter (CPU): correctness path, not a speed result",
                    **{**common, "shape": f"1x{k}x{v}", "floor_bytes": 2 * k * v * logits.element_size()},
                )
                continue
            yield Case(impl=f"fastpo[{backend}]", step=_step(_fused(backend), logits, *args), **common)
            yield Case(impl=f"fastpo[{backend}] is+klxr", step=_step(_fused_is(backend), logits, *args),
                       note="IS weights + KL x ratio (policy-parity features)", **common)
            # in place: the gradient overwrites a scratch copy of the logits each call
            scratch = logits.detach().clone().requires_grad_()
            yield Case(impl=f"fastpo[{backend}] inplace", step=_step(_fused(backend, True), scratch, *args), **common)
