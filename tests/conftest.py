"""Shared test helpers. fastpo is imported first so the Triton interpreter is set up
(TRITON_INTERPRET=1 on machines without CUDA) before anything imports triton."""
from __future__ import annotations

import fastpo  # noqa: F401  (must precede any triton import)
import pytest
import torch

from fastpo.ops import registry


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params(op: str) -> list:
    """(device, backend) pairs for every backend that can run ``op`` on this machine."""
    return [
        pytest.param(dev, b, id=f"{dev}-{b}")
        for dev in devices()
        for b in registry.backends_for(op, dev)
    ]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise max relative error: max|a - e| / max|e| (in float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / max(scale, 1e-30)


def make_logits(shape, dtype, device="cpu", *, scale=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def make_labels(shape, vocab, device="cpu", *, ignore_frac=0.2, ignore_index=-100, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignore_frac
    return labels.masked_fill(drop, ignore_index).to(device)
