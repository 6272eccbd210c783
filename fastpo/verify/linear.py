"""Verify cases for the fused linear ops (hidden states + lm_head, logits never materialised):
``linear_token_logprobs`` (log-prob, entropy, d/dhidden, d/dweight; d/dhidden with a frozen
head, log-probs only, its frozen-head path) and ``linear_policy_loss``
(loss, d/dhidden, d/dweight, d/dbias) against the float64 composition on the same upcast inputs
(logits = hidden @ weight.T + bias, softcapped, then the float64 reference). For 16-bit inputs
the reference rounds the logits where the op does (the GEMM's output and the softcap's output
are in the input dtype: a bf16 GEMM accumulates in fp32 and rounds once), so the check measures
the fused kernels, not the rounding of a bf16 product. Odd V and H, ignored rows, a chunk size
that does not divide the kept rows."""
from __future__ import annotations

from typing import Iterator

import torch

import fastpo
from fastpo.ops import registry
from fastpo.reference import token_logprobs_ref
from fastpo.reference.policy_loss import policy_loss_ref

from . import DTYPES, Check, dtype_name, rel_err

OP_TOKEN, OP_POLICY = "linear_token_logprobs", "linear_policy_loss"
SOFTCAP, TEMPERATURE = 30.0, 0.9
CONFIG = fastpo.PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.04, entropy_coef=0.01, temperature=0.9)


def _shapes(device: torch.device) -> list[tuple[int, int, int, int]]:
    """(B, T, H, V)."""
    if device.type == "cuda":
        return [(4, 512, 1024, 32000), (2, 256, 4096, 128256)]
    return [(2, 9, 33, 257), (2, 16, 64, 4099)]


def _logits64(h, w, b, dtype):
    """float64 logits from the upcast inputs, rounded to ``dtype`` where the op rounds."""
    rnd = (lambda x: x) if dtype in (torch.float32, torch.float64) else (lambda x: x.to(dtype).double())  # noqa: E731
    z = rnd(h @ w.T + b)
    return rnd(SOFTCAP * torch.tanh(z / SOFTCAP))


def _tol_grad(dtype):
    return 1e-5 if dtype == torch.float32 else 1.5e-2


def checks(device: torch.device) -> Iterator[Check]:
    gen = torch.Generator().manual_seed(0)
    for b, t, hdim, v in _shapes(device):
        h64 = torch.randn(b, t, hdim, generator=gen, dtype=torch.float64)
        w64 = torch.randn(v, hdim, generator=gen, dtype=torch.float64) / hdim ** 0.5 * 3
        b64 = torch.randn(v, generator=gen, dtype=torch.float64) * 0.1
        labels = torch.randint(0, v, (b, t), generator=gen)
        labels[:, :2] = -100  # the prompt: never multiplied
        old = torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3 - 5.0
        ref = old + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        adv = torch.randn(b, generator=gen, dtype=torch.float64)
        g_lp = torch.randn(b, t, generator=gen, dtype=torch.float64)
        labels, old, ref, adv, g_lp = (x.to(device) for x in (labels, old, ref, adv, g_lp))
        shape = f"{b}x{t} H={hdim} V={v}"
        for dtype in DTYPES:
            hs, ws, bs = (x.to(dtype).to(device) for x in (h64, w64, b64))
            # float64 composition on the upcast inputs
            rh, rw, rb = (x.double().requires_grad_() for x in (hs, ws, bs))
            lp_r, h_r = token_logprobs_ref(_logits64(rh, rw, rb, dtype), labels, temperature=TEMPERATURE)
            (grad_frozen,) = torch.autograd.grad((lp_r * g_lp).sum(), rh, retain_graph=True)
            grads_tok = torch.autograd.grad((lp_r * g_lp).sum() + h_r.sum(), (rh, rw))
            mask = labels != -100
            lp_p, h_p = token_logprobs_ref(_logits64(rh, rw, rb, dtype), labels, temperature=CONFIG.temperature)
            loss_r, _, _ = policy_loss_ref(lp_p, old, adv, mask, ref_logprobs=ref, entropy=h_p, config=CONFIG)
            grads_pol = torch.autograd.grad(loss_r, (rh, rw, rb))
            for backend in registry.backends_for("token_logprobs", device):
                if backend == "triton" and device.type == "cpu" and v > 1000:
                    continue  # the interpreter: the small shape covers it
                common = dict(backend=backend, dtype=dtype_name(dtype), shape=shape)
                x_h, x_w, x_b = (x.clone().requires_grad_() for x in (hs, ws, bs))
                lp, ent = fastpo.linear_token_logprobs(
                    x_h, x_w, labels, bias=x_b, temperature=TEMPERATURE, softcap=SOFTCAP, return_entropy=True,
                    chunk_size=5, backend=backend)
                gh, gw = torch.autograd.grad((lp * g_lp.float()).sum() + ent.sum(), (x_h, x_w))
                yield Check(op=OP_TOKEN, quantity="logp", error=rel_err(lp, lp_r), tol=1e-5, **common)
                yield Check(op=OP_TOKEN, quantity="entropy", error=rel_err(ent, h_r), tol=1e-5, **common)
                yield Check(op=OP_TOKEN, quantity="grad hidden", error=rel_err(gh, grads_tok[0]),
                            tol=_tol_grad(dtype), **common)
                yield Check(op=OP_TOKEN, quantity="grad weight", error=rel_err(gw, grads_tok[1]),
                            tol=_tol_grad(dtype), **common)
                x_h = hs.clone().requires_grad_()  # a frozen head, log-probs only: the frozen-head path
                lp = fastpo.linear_token_logprobs(x_h, ws, labels, bias=bs, temperature=TEMPERATURE, softcap=SOFTCAP,
                                                  chunk_size=5, backend=backend)
                (gh,) = torch.autograd.grad((lp * g_lp.float()).sum(), x_h)
                yield Check(op=OP_TOKEN, quantity="grad hidden, frozen head", error=rel_err(gh, grad_frozen),
                            tol=_tol_grad(dtype), **common)
                x_h, x_w, x_b = (x.clone().requires_grad_() for x in (hs, ws, bs))
                out = fastpo.linear_policy_loss(x_h, x_w, labels, old, adv, bias=x_b, ref_logprobs=ref, config=CONFIG,
                                                softcap=SOFTCAP, chunk_size=5, backend=backend)
                gh, gw, gb = torch.autograd.grad(out.loss, (x_h, x_w, x_b))
                yield Check(op=OP_POLICY, quantity="loss", error=rel_err(out.loss, loss_r), tol=1e-5, **common)
                for name, got, want in (("grad hidden", gh, grads_pol[0]), ("grad weight", gw, grads_pol[1]),
                                        ("grad bias", gb, grads_pol[2])):
                    yield Check(op=OP_POLICY, quantity=name, error=rel_err(got, want), tol=_tol_grad(dtype), **common)
