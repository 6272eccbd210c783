"""Verify cases for token_logprobs: forward (logp, entropy) and gradient."""
from __future__ import annotations

from typing import Iterator

import torch

import fastpo
from fastpo.ops import registry
from fastpo.reference import token_logprobs_ref

from . import DTYPES, Check, dtype_name, rel_err

OP = "token_logprobs"


def _shapes(device: torch.device) -> list[tuple[int, int]]:
    if device.type == "cuda":
        return [(4096, 32000), (1024, 128256), (257, 151936)]
    return [(8, 17), (16, 4099), (8, 32000)]  # odd V, a multi-block row, a real vocabulary


def checks(device: torch.device) -> Iterator[Check]:
    gen = torch.Generator().manual_seed(0)
    for n, v in _shapes(device):
        base = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, v, (n,), generator=gen)
        labels[:: max(1, n // 4)] = -100
        g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
        g_h = torch.randn(n, generator=gen, dtype=torch.float64)
        labels, g_lp, g_h = labels.to(device), g_lp.to(device), g_h.to(device)
        for dtype in DTYPES:
            logits = base.to(dtype).to(device)
            ref_x = logits.double().requires_grad_()
            lp_r, h_r = token_logprobs_ref(ref_x, labels, temperature=0.9)
            (grad_r,) = torch.autograd.grad((lp_r * g_lp).sum() + (h_r * g_h).sum(), ref_x)
            for backend in registry.backends_for(OP, device):
                x = logits.clone().requires_grad_()
                lp, h = fastpo.token_logprobs(x, labels, temperature=0.9, return_entropy=True, backend=backend)
                (grad,) = torch.autograd.grad((lp * g_lp.float()).sum() + (h * g_h.float()).sum(), x)
                tol_grad = 1e-5 if dtype == torch.float32 else 1.5e-2
                common = dict(op=OP, backend=backend, dtype=dtype_name(dtype), shape=f"{n}x{v}")
                yield Check(quantity="logp", error=rel_err(lp, lp_r), tol=1e-5, **common)
                yield Check(quantity="entropy", error=rel_err(h, h_r), tol=1e-5, **common)
                yield Check(quantity="grad", error=rel_err(grad, grad_r), tol=tol_grad, **common)
