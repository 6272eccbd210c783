"""Input checks shared by the public functions: clear errors before any kernel runs."""
from __future__ import annotations

import math

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits_labels(logits, labels, ignore_index: int) -> int:
    """Validate ``logits [..., V]`` against ``labels [...]`` (types, shapes, devices); returns V.

    The label *range* is checked by :func:`check_label_range` inside each custom op's
    implementation, which runs eagerly even under ``torch.compile`` (a check here would be
    traced away) and right before any kernel reads memory.
    """
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
    return vocab


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels must lie in ``[0, V)`` or equal ``ignore_index``; called inside the custom ops.

    CPU tensors: a ``ValueError`` naming the first bad label (reading a CPU tensor is free).
    CUDA tensors: ``torch._assert_async``, a device-side assertion that never synchronises
    the host (the step stays CUDA-graph capturable); the kernels additionally mask the
    label's read, so a bad label can never read out of bounds, and write NaN for its row.
    """
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    message = f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}"
    if labels.device.type == "cpu":
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"{message}; found {first}")
    else:
        torch._assert_async(~bad.any(), message)


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def as_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits as the kernels read them, without a copy, and labels [N] int64 contiguous.

    Kernels take ``[N, V]`` or ``[R, C, V]`` (any strides on the first two dims, unit stride
    along V; row ``r = i * C + j``). ``[..., V]`` is returned as a ``[N, V]`` view when its
    strides allow, else as ``[R, C, V]`` with the last leading dim as C (the causal-LM shift
    ``logits[:, :-1]`` is such a view); only a layout neither covers (or a non-unit stride
    along V) is copied.
    """
    vocab = logits.shape[-1]
    n = logits.numel() // vocab if vocab else 0
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    if logits.stride(-1) == 1 or vocab == 1:
        # decided from the strides, not by trying .view (under torch.compile a failed view of
        # a fake tensor raises a different error)
        if _collapsible(logits.shape[:-1], logits.stride()[:-1]):
            return logits.view(n, vocab), flat
        if logits.dim() >= 3 and _collapsible(logits.shape[:-2], logits.stride()[:-2]):
            return logits.view(-1, logits.shape[-2], vocab), flat
    return logits.reshape(n, vocab).contiguous(), flat


def _collapsible(shape, strides) -> bool:
    """Whether dims with these sizes / strides can be merged into one by a view."""
    dims = [(size, stride) for size, stride in zip(shape, strides) if size != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


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
