"""Public Level-3 functions (DESIGN.md §4): losses from hidden states and the lm_head.

``linear_token_logprobs``, ``linear_sequence_logprobs``, ``linear_policy_loss`` and
``linear_dpo_loss`` return the numbers of ``token_logprobs`` / ``sequence_logprobs`` /
``policy_loss`` / ``dpo_loss`` applied to the logits ``x(hidden @ weight.T + bias)``, without
materialising more than one chunk of them (``fastpo.ops.linear_head``). Inputs are validated
here, before any matmul.
"""
from __future__ import annotations

import math

import torch

from .._validation import LOGIT_DTYPES, check_temperature
from ..config import METRIC_KEYS, PolicyLossConfig, PolicyLossOutput
from ..ops import registry
from ..ops.linear_head import (EXTRAS, HeadOptions, LinearPolicyLossFunction, LinearTokenLogprobsFunction, PolicyInputs,
                               VocabShard)
from ..ops.vocab_parallel import check_vocab_parallel, vocab_shard_range
from ..ops.policy_loss import PolicyExtras
from .dpo_loss import DPOOutput, _check_dpo_args, _check_logps_shapes, _check_logps_types, dpo_loss_from_logprobs
from .policy_loss import _check_call_extras, _check_policy_inputs, check_bt, check_count
from ..reference.dpo_loss import LENGTH_NORMALIZED

__all__ = ["linear_token_logprobs", "linear_sequence_logprobs", "linear_policy_loss", "linear_dpo_loss"]

_DEFAULT_CONFIG = PolicyLossConfig()


# ----------------------------------------------------------------------------- checks
def _check_head(hidden, weight, labels, bias, name: str) -> None:
    """hidden ``[..., H]``, weight ``[V, H]``, labels ``hidden.shape[:-1]``, bias ``[V]``: types,
    shapes, dtypes and devices."""
    for arg, x in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name}: hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{name}: hidden must have shape [..., H] with H >= 1, got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: weight must have shape [V, H] = [V, {hidden.shape[-1]}] with V >= 1 "
                         f"(the lm_head, H from hidden), got {list(weight.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: labels shape {list(labels.shape)} must equal hidden's shape without H "
                         f"{list(hidden.shape[:-1])}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias must have shape [V] = [{weight.shape[0]}], got {list(bias.shape)}")
    # an fp32 head may serve 16-bit hidden states (autocast, a head kept in fp32)
    head_dtypes = (hidden.dtype,) + ((torch.float32,) if hidden.dtype in (torch.bfloat16, torch.float16) else ())
    for arg, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype not in head_dtypes:
            raise ValueError(f"{name}: {arg} dtype {x.dtype} must equal hidden's dtype {hidden.dtype}"
                             + (" or be float32" if len(head_dtypes) > 1 else ""))
    for arg, x in (("weight", weight), ("labels", labels), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name}: hidden is on {hidden.device} but {arg} is on {x.device}")


def _vocab_shard(process_group, backend, weight) -> VocabShard | None:
    """None, or this rank's ``VocabShard`` (validates the group and the backend, then one
    all-gather of the shard sizes ``weight.shape[0]``); call after ``_check_head``."""
    if process_group is None:
        return None
    check_vocab_parallel(process_group, backend)
    start, total = vocab_shard_range(weight.shape[0], process_group, weight.device)
    return VocabShard(process_group, start, total)


def _options(name, hidden, temperature, logit_scale, softcap, ignore_index, chunk_size, backend) -> HeadOptions:
    """The validated non-tensor options (hidden already checked: its device picks the backend)."""
    temperature = check_temperature(temperature)
    scale = float(logit_scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"{name}: logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None:
        cap = float(softcap)
        if not (math.isfinite(cap) and cap > 0.0):
            raise ValueError(f"{name}: softcap must be None or a finite number > 0, got {softcap!r}")
        softcap = cap
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{name}: ignore_index must be an integer, got {ignore_index!r}")
    return HeadOptions(temperature, scale, softcap, int(ignore_index), chunk_size,
                       registry.resolve("token_logprobs", backend, hidden.device))


def _rows(hidden, labels, keep):
    """hidden as ``[N, H]`` (a view where possible), labels ``[N]`` int64, the kept row ids ``[K]``
    and their labels. One host synchronisation: the number of kept rows sizes the chunk loop."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).to(torch.int64)
    rows = keep.reshape(-1).nonzero().flatten()
    return h2, rows, flat.index_select(0, rows).contiguous()


# ----------------------------------------------------------------------------- functions
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_mean_logits: bool = False,
    return_log_sum_sq_probs: bool = False,
    return_is_top1: bool = False,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
):
    """Per-token log-probability of the label (and entropy) from hidden states and the lm_head.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 for gradchecks).
        weight: ``[V, H]`` the lm_head, same device; same dtype, or float32 with bf16 / fp16
            hidden (autocast, a head kept in fp32): the GEMMs then run in hidden's dtype on a
            cast of the head (one extra V x H 16-bit buffer), and dL/dweight is accumulated and
            returned in fp32, never rounded to 16 bits. bias: ``[V]`` or None, likewise.
        labels: ``[...]`` (hidden's shape without H) integer, in ``[0, V)`` or ``ignore_index``.
        temperature, logit_scale, softcap: the logits are
            ``x = cap(hidden @ weight.T + bias) * logit_scale / temperature`` with
            ``cap(z) = softcap * tanh(z / softcap)`` (Gemma 2) or the identity (softcap None).
        return_entropy: also return ``H = -sum_j p_j log p_j`` (differentiable).
        return_mean_logits, return_log_sum_sq_probs, return_is_top1: also return, without
            gradient, the mean of the transformed logits over V, ``log sum_j p_j^2`` and whether
            the label is the (first) argmax — the extra outputs of TRL 1.16's fused LM head —
            computed on the same chunks (no extra GEMM); 0 / False at ignored positions. Not
            with ``process_group``.
        chunk_size: kept rows per chunk of logits; None: from V and the free memory
            (``fastpo.ops.linear_head.default_chunk_size``): a byte budget for the chunk's
            logits buffers, ``min(64 MiB, free / 16)`` (free: ``torch.cuda.mem_get_info`` on
            CUDA, ``MemAvailable`` of /proc/meminfo on CPU), divided by the bytes of one row
            (``V x itemsize``; with a softcap also its fp32 tanh and the capped copy), rounded
            down to a multiple of 64, at least 64, at most the number of kept rows: 512 rows for
            fp32 at V = 32000, 1024 for bf16. The free memory only matters below 1 GiB free;
            pass ``chunk_size`` for a dW summation order that never depends on it.
        process_group: vocabulary parallel (DESIGN.md §4): a ``torch.distributed`` group over
            which the head is sharded by vocabulary: ``weight`` ``[V_r, H]`` (``bias`` ``[V_r]``)
            is this rank's contiguous shard, shards in rank order, sizes may differ (offsets
            from one all-gather of the sizes); ``hidden`` is replicated (identical on every
            rank); labels are global ids. Outputs are identical on every rank; each rank gets
            exactly its slice of dL/dweight and dL/dbias, and dL/dhidden is all-reduced (SUM)
            inside the op's backward, so every rank holds the full hidden gradient. The op
            replaces a column-parallel lm_head plus a vocab-parallel cross-entropy: ``hidden``
            must NOT also pass through a copy-to-tensor-parallel region (its backward would
            all-reduce the hidden gradient a second time). Plain torch ops (``backend`` must be
            ``"auto"`` or ``"torch"``). Communication per call: forward one all-gather of the
            sizes and two all-reduces of kept-row statistics (``[K]`` and ``[3, K]``), backward
            one all-reduce of ``[N, H]`` (fp32 for half-precision hidden).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``, the backend of the
            logits-level kernels each chunk goes through.

    Returns:
        ``logprobs`` shaped like ``labels``, fp32 (fp64 for fp64 inputs), ``x_y - logsumexp(x)``;
        or a tuple ``(logprobs, entropy?, mean_logits?, log_sum_sq_probs?, is_top1?)`` of what
        was asked for, in that order. Equal to ``token_logprobs(x, labels, ...)`` on the
        materialised logits. Ignored positions give 0, cost no matmul and get zero gradient.

    Cost: forward 1 GEMM per chunk (keeps ``[K]`` vectors only), backward 3 (recomputed logits,
    dL/dhidden, dL/dweight accumulated in fp32). Frozen head (only ``hidden`` requires a
    gradient, e.g. LoRA) without ``return_entropy`` and without ``process_group``: the forward
    also forms each kept row's d logp / d hidden (1 more GEMM, ``[K, H]`` kept in hidden's
    dtype) and the backward only scales it by the upstream: 2 GEMMs per chunk in all, not 3. Peak extra memory: one ``chunk x V`` logits
    buffer, dL/dhidden and the fp32 ``V x H`` dW accumulator (for fp32 weights it is the
    returned dW; for 16-bit ones also the 16-bit dW it is cast to at the end); never ``N x V``.
    """
    name = "linear_token_logprobs"
    _check_head(hidden, weight, labels, bias, name)
    shard = _vocab_shard(process_group, backend, weight)
    opts = _options(name, hidden, temperature, logit_scale, softcap, ignore_index, chunk_size, backend)
    h2, rows, kept_labels = _rows(hidden, labels, labels != ignore_index)
    flags = (return_mean_logits, return_log_sum_sq_probs, return_is_top1)
    extras = tuple(name for name, on in zip(EXTRAS, flags) if on)
    logp, entropy, *more = LinearTokenLogprobsFunction.apply(h2, weight, bias, kept_labels, rows, opts, shard, extras,
                                                             return_entropy)
    outs = [logp] + ([entropy] if return_entropy else []) + more
    outs = [o.view(labels.shape) for o in outs]
    return outs[0] if len(outs) == 1 else tuple(outs)


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    average: bool = False,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence log-probability ``[B]`` from hidden ``[B, T, H]`` and the lm_head: the masked
    sum over T (or, ``average=True``, the mean over kept tokens, 0 for a sequence without one) of
    ``linear_token_logprobs`` (same arguments). Equal to ``sequence_logprobs`` on the
    materialised logits up to the order of the fp32 summation."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"linear_sequence_logprobs: hidden must have shape [B, T, H], got {list(hidden.shape)}")
    logp = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                                 chunk_size=chunk_size, process_group=process_group, backend=backend)
    total = logp.sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp_min(1).to(total.dtype)
    return total


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    config: PolicyLossConfig = _DEFAULT_CONFIG,
    num_tokens=None,
    num_sequences=None,
    policy_weights: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    aux_num_tokens=None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> PolicyLossOutput:
    """PPO-family policy loss from hidden states ``[B, T, H]`` and the lm_head ``[V, H]``.

    The same numbers as ``policy_loss(x, labels, old_logprobs, advantages, ...)`` on the
    materialised logits ``x = cap(hidden @ weight.T + bias) * logit_scale`` (``config.temperature``
    divides them; ``cap`` as in ``linear_token_logprobs``), every other argument as there.
    Only kept tokens (``mask & (labels != ignore_index)``) cost a matmul; the gradient of hidden,
    weight and bias is formed in the forward, chunk by chunk, and the backward only scales it by
    the upstream scalar. Token-local configs (ppo, cispo, sapo, pg; KL, entropy, policy_weights,
    kl_agg / entropy_agg) on the triton / cpu / cuda backends: the fused policy kernel writes
    dL/dlogits over each chunk (3 GEMMs per chunk). Sequence-level configs (gspo, gmpo, vespo,
    off_policy_mask_threshold, top_entropy_quantile < 1) and the torch backend: two chunk passes
    (4 GEMMs per chunk). ``chunk_size``: as in ``linear_token_logprobs``.
    ``process_group``: vocabulary parallel, as in ``linear_token_logprobs`` (weight / bias this
    rank's shard, hidden replicated, outputs identical on every rank); always the two-pass torch
    path; the whole gradient is formed in the forward, so the all-reduce (SUM) of dL/dhidden
    ``[N, H]`` happens there (when hidden, weight or bias needs a gradient), after the two
    all-reduces of kept-token statistics.

    Returns:
        :class:`fastpo.PolicyLossOutput`: ``loss`` (0-dim fp32, fp64 for fp64 inputs,
        differentiable in hidden, weight, bias), ``per_token_loss`` ``[B, T]`` (detached) and
        ``metrics``.
    """
    name = "linear_policy_loss"
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a fastpo.PolicyLossConfig, got {type(config).__name__}")
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"{name}: hidden must have shape [B, T, H], got {list(hidden.shape)}")
    _check_head(hidden, weight, labels, bias, name)
    opts = _options(name, hidden, config.temperature, logit_scale, softcap, ignore_index, chunk_size, backend)
    shape, device = tuple(labels.shape), hidden.device
    valid = labels != ignore_index
    if mask is None:
        mask = valid
    else:
        check_bt("mask", mask, shape, mask=True)
        if mask.device != device:
            raise ValueError(f"{name}: hidden is on {device} but mask is on {mask.device}")
        mask = (mask if mask.dtype == torch.bool else mask != 0) & valid
    placeholder = torch.zeros(shape, device=device)  # logp / entropy come from the head
    _check_policy_inputs(placeholder, old_logprobs, advantages, mask, ref_logprobs, placeholder, config)
    check_count("num_tokens", num_tokens)
    check_count("num_sequences", num_sequences)
    _check_call_extras(shape, device, config, policy_weights, rollout_logprobs, aux_num_tokens)
    shard = _vocab_shard(process_group, backend, weight)
    num_tokens, num_sequences = (
        c.reshape(()) if isinstance(c, torch.Tensor) else c for c in (num_tokens, num_sequences)
    )
    h2, rows, kept_labels = _rows(hidden, labels, mask)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    inputs = PolicyInputs(old_logprobs.detach(), advantages.detach(), detach(ref_logprobs), mask,
                          num_tokens, num_sequences)
    extras = PolicyExtras(detach(policy_weights), detach(rollout_logprobs), aux_num_tokens)
    loss, per_token, stacked = LinearPolicyLossFunction.apply(
        h2, weight, bias, kept_labels, rows, opts, inputs, config, METRIC_KEYS, extras, shard)
    return PolicyLossOutput(loss, per_token, dict(zip(METRIC_KEYS, stacked.unbind(0))))


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reduction: str = "mean",
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    process_group=None,
    backend: str = "auto",
) -> DPOOutput:
    """DPO-family loss from hidden ``[2B, T, H]`` (B chosen rows, then B rejected) and the
    lm_head: ``dpo_loss_from_logprobs`` on the halves of ``linear_sequence_logprobs(hidden,
    weight, labels, ...)`` with the completion lengths counted from the labels, i.e. the numbers
    of ``dpo_loss`` on the materialised logits. Arguments as in ``dpo_loss`` and
    ``linear_token_logprobs``."""
    name = "linear_dpo_loss"
    _check_dpo_args(beta, loss_type, label_smoothing, reduction, gamma)
    if process_group is not None:
        check_vocab_parallel(process_group, backend)
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"{name}: hidden must have shape [2B, T, H], got {list(hidden.shape)}")
    _check_head(hidden, weight, labels, bias, name)
    _options(name, hidden, temperature, logit_scale, softcap, ignore_index, chunk_size, backend)
    rows = hidden.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"{name}: hidden must hold 2B rows (B chosen, then B rejected) with B >= 1, got {rows}")
    batch = rows // 2
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    _check_logps_types(refs, loss_type)
    _check_logps_shapes(refs, batch, hidden.device, f"(one per pair: hidden has {rows} rows = 2 x {batch})",
                        "hidden")
    lengths = (labels != ignore_index).sum(-1)
    if loss_type in LENGTH_NORMALIZED:
        empty = (lengths == 0).nonzero().flatten()
        if empty.numel() > 0:
            raise ValueError(f"{name}: loss_type {loss_type!r} divides by the completion length, but row(s) "
                             f"{empty.tolist()[:8]} of labels have no completion token")
    logps = linear_sequence_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                     logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                                     chunk_size=chunk_size, process_group=process_group, backend=backend)
    return dpo_loss_from_logprobs(
        logps[:batch], logps[batch:], ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
        chosen_lengths=lengths[:batch], rejected_lengths=lengths[batch:], reduction=reduction,
    )
