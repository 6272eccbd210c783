"""The stand-in for TRL 1.16's fused LM head, ``trl.kernels.ChunkedLogProbFunction``.

``add_fused_lm_head`` (``trl/trainer/utils.py``) calls, at every fused forward,
``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden [N, H], weight [V, H], bias [V] | None,
targets [N], temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` and
unpacks ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` or None.
``FastpoChunkedLogProb.apply`` keeps that contract and runs ``fastpo.linear_token_logprobs``.
"""
from __future__ import annotations

import math
import warnings

import torch

from .._validation import LOGIT_DTYPES
from ..functional.linear import linear_token_logprobs
from ..functional.token_logprobs import token_logprobs

__all__ = ["FastpoChunkedLogProb", "TRL_OPTIONAL_OUTPUTS", "compute_dtype", "fastpo_options", "zero3_enabled"]

# TRL's ``OPTIONAL_OUTPUTS`` (trl/kernels/chunked_logprob.py), in the order of its return tuple
TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_warned: set[str] = set()
# A call whose logits take at most this many bytes keeps them from the forward for the backward:
# 3 LM-head GEMMs (logits; dL/dhidden, dL/dweight) instead of 4 (the backward's recompute).
# N = 2048, V = 32000, fp32 (250 MiB) does; a larger call keeps nothing (all or nothing: a part
# kept would add up to this much memory to a call that already holds a V x H fp32 dW for a
# fraction of the saving).
KEEP_LOGITS_BYTES = 256 << 20


def _trl_function():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    return ChunkedLogProbFunction


def zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def fastpo_options(temperature, softcap, logit_scale):
    """fastpo's ``(softcap, logit_scale)`` for TRL's transform, or None when not expressible.

    TRL: ``x = s * tanh(z * L / s) / T``; fastpo: ``x = c * tanh(z / c) * L / T``. They agree
    with ``c = s / L``, so only ``L > 0`` and ``s > 0`` (finite) are needed."""
    if not (_positive(temperature) and _positive(logit_scale)):
        return None
    if softcap is None:
        return None, float(logit_scale)
    if not _positive(softcap):
        return None
    return float(softcap) / float(logit_scale), float(logit_scale)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's compute dtype of the head: the autocast dtype when autocast is on for hidden's
    device, else hidden's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _why_not(hidden, weight, targets, temperature, softcap, logit_scale, outputs) -> str | None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1 or hidden.dtype not in LOGIT_DTYPES:
        return "inputs other than hidden [N, H] float, weight [V, H], targets [N]"
    if any(name not in TRL_OPTIONAL_OUTPUTS + ("log_probs",) for name in outputs):
        return f"unknown outputs {tuple(outputs)}"
    if fastpo_options(temperature, softcap, logit_scale) is None:
        return "temperature / logit_scale / final_logit_softcapping not all finite and > 0"
    return None


def _gather_ctx(weight, bias):
    """TRL's own ``maybe_gather_lm_head_ctx`` (looked up per call, as TRL's backward does): the
    ZeRO-3 all-gather of the partitioned head, a null context otherwise."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx
    return maybe_gather_lm_head_ctx(weight, bias)


class _RegatheredHead(torch.autograd.Function):
    """DeepSpeed ZeRO-3: ``head(hidden, weight, bias)`` with the head re-gathered for its backward.

    TRL gathers the partitioned head only around its ``.apply`` call; afterwards ZeRO-3 sets the
    parameter's data back to its empty partition, and a backward that reads the saved weight (the
    recompute's GEMMs, ``dz @ W``) would see ``numel 0``. The forward builds the head's graph on
    the parameters themselves (hidden detached), the backward enters TRL's gather context and runs
    that graph's backward inside it, returning the gradients (ZeRO-3 reduces them from there)."""

    @staticmethod
    def forward(ctx, head, hidden, weight, bias):
        h = hidden.detach().requires_grad_(hidden.requires_grad)
        with torch.enable_grad():
            outs = head(h, weight, bias)
        ctx.graph = (h, weight, bias, outs)
        ret = tuple(None if o is None else o.detach() for o in outs)
        ctx.mark_non_differentiable(*[r for r, o in zip(ret, outs) if o is not None and not o.requires_grad])
        return ret

    @staticmethod
    def backward(ctx, *grads):
        h, weight, bias, outs = ctx.graph
        del ctx.graph
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
        inputs = [t for t in (h, weight, bias) if t is not None and t.requires_grad]
        found = iter(())
        if pairs and inputs:
            with _gather_ctx(weight, bias):
                found = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                                 allow_unused=True))
        return (None,) + tuple(next(found, None) if t is not None and t.requires_grad else None
                               for t in (h, weight, bias))


class FastpoChunkedLogProb:
    """``trl.kernels.ChunkedLogProbFunction.apply``'s contract, computed by fastpo.

    Compute dtype as in TRL: the autocast dtype when autocast is on for hidden's device, else
    hidden's; hidden, weight and bias are cast to it (differentiably) and the op runs with
    autocast off, accumulating in fp32. Outputs: ``log_probs`` ``[N]`` fp32 and, when named in
    ``outputs``, ``entropy`` ``[N]`` fp32 (differentiable), ``log_sum_sq_probs``,
    ``mean_logits`` ``[N]`` fp32 and ``is_top1`` ``[N]`` bool (no gradient); None otherwise.
    ``chunk_size`` is TRL's vocabulary tile width; fastpo chunks by rows and ignores it.
    Under DeepSpeed ZeRO-3 the backward re-gathers the head through TRL's own
    ``maybe_gather_lm_head_ctx`` (``_RegatheredHead``), as TRL's function does.
    When a gradient will be needed (log-probs / entropy, no softcap) and the call's logits fit
    in ``KEEP_LOGITS_BYTES``, they are kept for the backward (``F.linear`` +
    ``token_logprobs(inplace_backward=True)``: 3 GEMMs); otherwise ``linear_token_logprobs``,
    whose backward recomputes each chunk (4 GEMMs, only ``[N]`` vectors kept). Inputs fastpo
    does not take (see ``_why_not``) go to TRL's own function, with a one-time warning.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=TRL_OPTIONAL_OUTPUTS):
        why = _why_not(hidden, weight, targets, temperature, final_logit_softcapping, logit_scale, outputs)
        if why is not None:
            if why not in _warned:
                _warned.add(why)
                warnings.warn(f"fastpo.integrations.trl: {why}; using TRL's ChunkedLogProbFunction", stacklevel=2)
            return _trl_function().apply(hidden, weight, bias, targets, temperature, chunk_size,
                                         final_logit_softcapping, logit_scale, outputs)
        softcap, scale = fastpo_options(temperature, final_logit_softcapping, logit_scale)
        dtype = compute_dtype(hidden)
        names = ("log_probs",) + TRL_OPTIONAL_OUTPUTS

        wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        zero3 = wants_grad and zero3_enabled()

        def head(hidden, weight, bias):
            with torch.autocast(hidden.device.type, enabled=False):
                h = hidden.to(dtype)
                if zero3 and weight.dtype == torch.float32 and dtype != torch.float32:
                    w, b = weight, bias  # an fp32 head stays fp32: no V x H 16-bit copy saved (see below)
                else:
                    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
                if not zero3 and _keeps_logits(h, w, b, softcap, outputs):
                    named = _kept_logits_head(h, w, b, targets, temperature / scale, outputs)
                else:
                    named = _recomputing_head(h, w, b, targets, temperature, scale, softcap, outputs)
            fp32 = lambda t: t if t is None or t.dtype in (torch.float32, torch.bool) else t.float()  # noqa: E731
            return tuple(fp32(named.get(n)) for n in names)

        frozen = not any(t is not None and t.requires_grad for t in (weight, bias))
        if zero3 and not (frozen and "entropy" not in outputs):
            # ZeRO-3: only the recompute route, which saves the head parameters themselves (kept
            # logits would pin the gathered weight through F.linear's saved transpose, and a
            # cast would save a full V x H copy), and a backward that re-gathers them. A frozen
            # head without entropy takes linear_token_logprobs's frozen-head path, whose
            # backward never reads the head: no re-gather needed.
            return _RegatheredHead.apply(head, hidden, weight, bias)
        return head(hidden, weight, bias)


def _keeps_logits(hidden, weight, bias, softcap, outputs) -> bool:
    """Keep the logits (``KEEP_LOGITS_BYTES``) only when a gradient will be asked for, without
    softcap, for log-probs / entropy only (the other outputs come from the linear op's chunks)."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad or softcap is not None or any(n not in ("log_probs", "entropy") for n in outputs):
        return False
    frozen = not any(t is not None and t.requires_grad for t in (weight, bias))
    if frozen and "entropy" not in outputs:
        return False  # linear_token_logprobs's frozen-head path: the same 2 GEMMs, no logits kept
    return 0 < hidden.shape[0] * weight.shape[0] * weight.element_size() <= KEEP_LOGITS_BYTES


def _kept_logits_head(hidden, weight, bias, targets, temperature, outputs) -> dict:
    """``token_logprobs`` of the logits ``hidden @ weight.T + bias`` held until the backward, which
    writes dL/dlogits into them (``inplace_backward``) and takes dL/dhidden, dL/dweight from the
    linear's own backward: 3 GEMMs."""
    got = token_logprobs(torch.nn.functional.linear(hidden, weight, bias), targets, temperature=temperature,
                         return_entropy="entropy" in outputs, inplace_backward=True)
    return dict(zip(("log_probs", "entropy"), got if isinstance(got, tuple) else (got,)))


def _recomputing_head(hidden, weight, bias, targets, temperature, scale, softcap, outputs) -> dict:
    """``linear_token_logprobs``: [N] vectors kept, the backward recomputes each chunk's logits."""
    got = linear_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=float(temperature), logit_scale=scale, softcap=softcap,
        return_entropy="entropy" in outputs, return_mean_logits="mean_logits" in outputs,
        return_log_sum_sq_probs="log_sum_sq_probs" in outputs, return_is_top1="is_top1" in outputs)
    got = list(got) if isinstance(got, tuple) else [got]
    # fastpo's order: logp, entropy?, mean_logits?, log_sum_sq_probs?, is_top1?
    return dict(zip(["log_probs"] + [n for n in ("entropy", "mean_logits", "log_sum_sq_probs", "is_top1")
                                     if n in outputs], got))
