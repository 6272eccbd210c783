"""Public `token_logprobs`: the fused log-softmax gather with optional entropy."""
from __future__ import annotations

import torch

from .._validation import as_rows, check_logits_labels, check_temperature
from ..ops import registry
from ..ops.token_logprobs import TokenLogprobsFunction

__all__ = ["token_logprobs"]


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    backend: str = "auto",
):
    """Per-token log-probability of the label (and entropy) from logits, fused.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 accepted for
            gradchecks); the last dimension should be contiguous.
        labels: ``[...]`` integer, in ``[0, V)`` or equal to ``ignore_index``.
        temperature: runtime divisor of the logits, ``x = logits / temperature``.
        return_entropy: also return ``H = -sum_j p_j log p_j`` (differentiable).
        inplace_backward: the backward writes dL/dlogits into the logits buffer
            (no second N x V allocation). The logits must not be used afterwards.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"`` (DESIGN.md §2).

    Returns:
        ``logprobs`` shaped like ``labels`` in float32 (float64 for float64 logits),
        ``logprobs = x_y - logsumexp(x)``; or ``(logprobs, entropy)``. Ignored
        positions give exactly 0 and receive exactly zero gradient.
    """
    if process_group is not None:
        raise NotImplementedError("vocabulary-parallel token_logprobs (process_group) is not implemented yet")
    check_logits_labels(logits, labels, ignore_index)
    temperature = check_temperature(temperature)
    name = registry.resolve("token_logprobs", backend, logits.device)
    rows, flat_labels = as_rows(logits, labels)
    logp, entropy = TokenLogprobsFunction.apply(
        rows, flat_labels, temperature, int(ignore_index), name, bool(inplace_backward)
    )
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
