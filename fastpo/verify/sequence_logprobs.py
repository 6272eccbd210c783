"""Verify cases for sequence_logprobs: masked sum and mean per sequence, and the gradient."""
from __future__ import annotations

from typing import Iterator

import torch

from fastpo.functional.sequence_logprobs import sequence_logprobs
from fastpo.ops import registry
from fastpo.reference.sequence_logprobs import sequence_logprobs_ref

from . import DTYPES, Check, dtype_name, rel_err

OP = "sequence_logprobs"


def _shapes(device: torch.device) -> list[tuple[int, int, int]]:
    if device.type == "cuda":
        return [(8, 1024, 32000), (4, 512, 128256), (2, 257, 151936)]
    return [(4, 3, 17), (2, 4, 4099), (2, 8, 32000)]  # odd V, a multi-block row, a real vocabulary


def checks(device: torch.device) -> Iterator[Check]:
    gen = torch.Generator().manual_seed(0)
    for b, t, v in _shapes(device):
        base = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, v, (b, t), generator=gen)
        labels[:, : max(1, t // 4)] = -100  # a prompt prefix
        labels[-1] = -100  # one sequence with no completion token
        upstream = torch.randn(b, generator=gen, dtype=torch.float64)
        labels, upstream = labels.to(device), upstream.to(device)
        for dtype in DTYPES:
            logits = base.to(dtype).to(device)
            for average in (False, True):
                ref_x = logits.double().requires_grad_()
                out_r = sequence_logprobs_ref(ref_x, labels, temperature=0.9, average=average)
                (grad_r,) = torch.autograd.grad((out_r * upstream).sum(), ref_x)
                for backend in registry.backends_for(OP, device):
                    x = logits.clone().requires_grad_()
                    out = sequence_logprobs(x, labels, temperature=0.9, average=average, backend=backend)
                    (grad,) = torch.autograd.grad((out * upstream.float()).sum(), x)
                    common = dict(op=OP, backend=backend, dtype=dtype_name(dtype), shape=f"{b}x{t}x{v}")
                    kind = "mean" if average else "sum"
                    yield Check(quantity=kind, error=rel_err(out, out_r), tol=1e-5, **common)
                    tol_grad = 1e-5 if dtype == torch.float32 else 1.5e-2
                    yield Check(quantity=f"grad ({kind})", error=rel_err(grad, grad_r), tol=tol_grad, **common)
