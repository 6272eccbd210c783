"""Public `token_logprobs`: the fused log-softmax gather with optional entropy."""
from __future__ import annotations

import torch

from .._validation import as_rows, check_logits_labels, check_temperature
from ..ops import registry
from ..ops.token_logprobs import TokenLogprobsFunction
from ..ops.vocab_parallel import check_vocab_parallel, vocab_parallel_token_logprobs

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
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded:
            ``logits`` is this rank's contiguous shard ``[..., V_r]`` (shards in rank order,
            sizes may differ), ``labels`` are global ids in ``[0, sum_r V_r)``, identical on
            every rank; the outputs are identical on every rank and the gradient is this rank's
            slice of the unsharded one (``fastpo.ops.vocab_parallel``: torch implementation,
            backend "auto" / "torch", two all-reduces of per-row statistics per call).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"`` (DESIGN.md §2).

    Returns:
        ``logprobs`` shaped like ``labels`` in float32 (float64 for float64 logits),
        ``logprobs = x_y - logsumexp(x)``; or ``(logprobs, entropy)``. Ignored
        positions give exactly 0 and receive exactly zero gradient.
    """
    check_logits_labels(logits, labels, ignore_index)
    temperature = check_temperature(temperature)
    if process_group is not None:
        check_vocab_parallel(process_group, backend)
        logp, entropy = vocab_parallel_token_logprobs(
            logits, labels, temperature=temperature, ignore_index=int(ignore_index), group=process_group,
            inplace_backward=bool(inplace_backward),
        )
        return (logp, entropy) if return_entropy else logp
    name = registry.resolve("token_logprobs", backend, logits.device)
    rows, flat_labels = as_rows(logits, labels)
    logp, entropy = TokenLogprobsFunction.apply(
        rows, flat_labels, temperature, int(ignore_index), name, bool(inplace_backward)
    )
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
