"""fastpo-served stand-ins for TRL 1.16's logits-level helpers (``trl/trainer/utils.py``):
``selective_log_softmax``, ``entropy_from_logits`` and ``selective_log_softmax_and_entropy``.

Same signatures and dtype rules as TRL's (outputs in the logits' dtype). What fastpo does not
take — an index with a trailing ``K`` dimension (top-K gathers), non-float logits, an index or
row mask of another shape or device — goes to TRL's original, with a one-time warning.
"""
from __future__ import annotations

import warnings

import torch

from .._validation import LOGIT_DTYPES
from ..functional.token_logprobs import token_logprobs

__all__ = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"]

_IGNORE = -100  # masked rows become ignored labels: 0 out, zero gradient, no work
_warned: set[str] = set()


def _trl_original(name: str):
    """TRL's own function, even while ``fastpo.integrations.trl`` is enabled."""
    from . import trl as _switch
    return _switch.original(name)


def _fallback(name: str, why: str):
    if (name, why) not in _warned:
        _warned.add((name, why))
        warnings.warn(f"fastpo.integrations.trl: {name} with {why} is not served by fastpo; using TRL's",
                      stacklevel=3)
    return _trl_original(name)


def _why_not(logits, index=None, row_mask=None) -> str | None:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in LOGIT_DTYPES or logits.dim() < 1:
        return "logits that are not a float tensor [..., V]"
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
            return "an index that is not an int32 / int64 tensor"
        if tuple(index.shape) != tuple(logits.shape[:-1]):
            return "an index of shape [..., K] (one gather per row only)"
        if index.device != logits.device:
            return "index on another device"
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or tuple(row_mask.shape) != tuple(logits.shape[:-1]) \
                or row_mask.device != logits.device:
            return "a row_mask not shaped and placed like the index"
    return None


def _labels(index, row_mask):
    index = index.long()
    return index if row_mask is None else index.masked_fill(row_mask == 0, _IGNORE)


def _check_temperature(temperature) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)`` for logits ``[..., V]`` and index
    ``[...]``, in the logits' dtype (TRL's rule), via ``fastpo.token_logprobs`` (fp32 math);
    rows where ``row_mask == 0`` give 0. An index ``[..., K]``: TRL's original."""
    _check_temperature(temperature)
    why = _why_not(logits, index, row_mask)
    if why is not None:
        return _fallback("selective_log_softmax", why)(logits, index, temperature, row_mask)
    logp = token_logprobs(logits, _labels(index, row_mask), temperature=temperature, ignore_index=_IGNORE)
    return logp.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy ``[...]`` (nats) of ``softmax(logits)`` for logits ``[..., V]``, in the logits'
    dtype, differentiable. ``chunk_size`` (TRL's row chunk) is not needed: fastpo never holds
    more than the logits and per-row statistics."""
    why = _why_not(logits)
    if why is not None:
        return _fallback("entropy_from_logits", why)(logits, chunk_size)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = token_logprobs(logits, labels, return_entropy=True)
    return entropy.to(logits.dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: torch.Tensor | None = None):
    """``(selective_log_softmax(...), entropy of softmax(logits / temperature))`` in one pass,
    both in the logits' dtype; rows where ``row_mask == 0`` give 0 for both; the entropy is
    detached unless ``entropy_requires_grad``."""
    _check_temperature(temperature)
    why = _why_not(logits, index, row_mask)
    if why is not None:
        return _fallback("selective_log_softmax_and_entropy", why)(logits, index, entropy_requires_grad,
                                                                   temperature, row_mask)
    logp, entropy = token_logprobs(logits, _labels(index, row_mask), temperature=temperature,
                                   ignore_index=_IGNORE, return_entropy=True)
    entropy = entropy.to(logits.dtype)
    return logp.to(logits.dtype), entropy if entropy_requires_grad else entropy.detach()
