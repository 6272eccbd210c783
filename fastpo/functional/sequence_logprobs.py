"""Public `sequence_logprobs`: fused log-softmax gather + masked sum (or mean) per sequence."""
from __future__ import annotations

import torch

from .._validation import as_sequences, check_sequence_logits, check_temperature
from ..ops import registry
from ..ops.sequence_logprobs import SequenceLogprobsFunction
from ..ops.vocab_parallel import check_vocab_parallel, vocab_parallel_sequence_logprobs

__all__ = ["sequence_logprobs"]


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    average: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence log-probability of the labels, ``log pi(y_b | x_b)``, fused over the vocabulary.

    Args:
        logits: ``[B, T, V]`` float32 / bfloat16 / float16 (float64 accepted for gradchecks),
            already aligned with ``labels`` (for a causal LM pass ``logits[:, :-1]`` with
            ``labels[:, 1:]``: any B and T strides are read in place, only V must be contiguous).
        labels: ``[B, T]`` integer, in ``[0, V)`` or ``ignore_index`` (prompt and padding).
        temperature: runtime divisor of the logits, ``x = logits / temperature``.
        average: return the mean over kept tokens instead of the sum.
        inplace_backward: the backward writes dL/dlogits into the logits buffer (no second
            ``B x T x V`` allocation); the logits must not be used afterwards.
        process_group: vocabulary parallel: ``logits`` is this rank's shard ``[B, T, V_r]`` and
            ``labels`` hold global ids, as in :func:`fastpo.token_logprobs`; same numbers as the
            unsharded call, identical on every rank, each rank gets its gradient slice.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"`` (DESIGN.md section 2).

    Returns:
        ``[B]`` float32 (float64 for float64 logits). With ``keep = labels != ignore_index``
        and ``logp_t = x_t,y_t - logsumexp(x_t)``:
        ``out_b = sum_t keep_bt logp_bt`` or, with ``average=True``,
        ``out_b = sum_t keep_bt logp_bt / max(1, sum_t keep_bt)``. A sequence with no kept token
        gives exactly 0 (also for the mean), and ignored tokens receive exactly zero gradient.

    Cost: the forward reads the logits once; the backward reads them once more and writes
    the gradient once. Deterministic and batch invariant (DESIGN.md section 3).
    """
    check_sequence_logits(logits, labels, ignore_index)
    temperature = check_temperature(temperature)
    if process_group is not None:
        check_vocab_parallel(process_group, backend)
        return vocab_parallel_sequence_logprobs(
            logits, labels, temperature=temperature, ignore_index=int(ignore_index), average=bool(average),
            group=process_group, inplace_backward=bool(inplace_backward),
        )
    name = registry.resolve("sequence_logprobs", backend, logits.device)
    logits, labels = as_sequences(logits, labels)
    return SequenceLogprobsFunction.apply(
        logits, labels, temperature, int(ignore_index), bool(average), name, bool(inplace_backward)
    )
