"""Input checks shared by the public functions: clear errors before any kernel runs."""
from __future__ import annotations

import math

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits_labels(logits, labels, ignore_index: int, *, check_range: bool = True) -> int:
    """Validate ``logits [..., V]`` against ``labels [...]``; returns V."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("logits and labels must be torch.Tensor")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension: shape [..., V]")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocabulary "
            f"dimension {tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but labels are on {labels.device}")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError("vocabulary dimension V must be at least 1")
    if check_range and labels.numel() > 0 and not _is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
            )
    return vocab


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def as_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to logits [N, V] (unit stride along V) and labels [N] int64 contiguous."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, labels.reshape(-1).to(torch.int64).contiguous()


def check_sequence_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> int:
    """Validate per-sequence inputs ``logits [B, T, V]`` / ``labels [B, T]``; returns V."""
    if isinstance(logits, torch.Tensor) and logits.dim() != 3:
        raise ValueError(
            f"logits must have shape [B, T, V] (batch, sequence, vocabulary), got {list(logits.shape)}"
        )
    return check_logits_labels(logits, labels, ignore_index)


def as_sequences(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V] with unit stride along V (any B, T strides: no copy for a slice such as
    ``logits[:, :-1]``) and labels [B, T] int64 contiguous."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, labels.to(torch.int64).contiguous()
