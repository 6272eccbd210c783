"""policy_loss from logits: the fused kernel path, the two-phase path, autograd.

Two ways to produce the same numbers as ``policy_loss_from_logprobs(token_logprobs(...))``:

* fused (triton, cuda and cpu backends; variants "ppo", "cispo", "sapo", "pg", with
  KL x ratio, IS weights and separate KL / entropy aggregations): one kernel
  computes, per token, the log-prob, entropy, ratio, policy term, KL and
  entropy terms (csrc/policy_math.h mirrors the Triton math) and writes
  dL/dlogits during the forward (the aggregation weight of every token is known
  beforehand: it is the derivative of the one aggregation formula,
  ``aggregate_ref``). Traffic: read the logits twice, write the gradient once.
* two-phase (every backend; the sequence-level features everywhere: gspo, gmpo, vespo,
  the off-policy mask and the top-entropy quantile need every token of the sequence first): phase 1 is the token_logprobs forward kernel
  (logp, entropy, lse); the per-token loss and its derivatives in logp and entropy
  are evaluated by the reference itself on the [B, T] log-probs (cheap, and equal
  to the composed path by construction); phase 2 is the token_logprobs backward
  kernel, which writes dL/dlogits. Same traffic, no N x V intermediate.

Either way the gradient exists when the forward returns; ``PolicyLossFunction``'s
backward only scales it by the upstream scalar (skipped when that is exactly 1).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from .._validation import check_label_range
from ..kernels.policy_args import PolicyKernelArgs
from ..reference._dtypes import acc_dtype
from ..reference.policy_loss import aggregate_ref, policy_loss_ref
from . import registry
from .grad_scale import GradBuffer
from .token_logprobs import token_logprobs_bwd_inplace_op, token_logprobs_bwd_op, token_logprobs_fwd_op

OP = "policy_loss"

registry.register(OP, "triton", fwd="fastpo.kernels.policy_loss:policy_loss_fwd")
registry.register(OP, "cpu", fwd="fastpo.kernels.cpp:policy_loss_fwd")
registry.register(OP, "cuda", fwd="fastpo.kernels.cpp:policy_loss_fwd")

# PolicyKernelArgs travels through the custom op's schema as two lists, in field order.
_ARG_FIELDS = dataclasses.fields(PolicyKernelArgs)
_FLOAT_FIELDS = tuple(f.name for f in _ARG_FIELDS if f.type in ("float", float))
_INT_FIELDS = tuple(f.name for f in _ARG_FIELDS if f.name not in _FLOAT_FIELDS)


def _pack(args: PolicyKernelArgs) -> tuple[list[float], list[int]]:
    return [float(getattr(args, k)) for k in _FLOAT_FIELDS], [int(getattr(args, k)) for k in _INT_FIELDS]


def _unpack(floats: list[float], ints: list[int]) -> PolicyKernelArgs:
    types = {f.name: f.type for f in _ARG_FIELDS}
    values = dict(zip(_FLOAT_FIELDS, floats))
    values.update({k: (bool(v) if types[k] in ("bool", bool) else int(v)) for k, v in zip(_INT_FIELDS, ints)})
    return PolicyKernelArgs(**values)


def _fused_launch(logits, labels, old, adv, ref, weight, floats, ints, backend, grad_out, policy_w, kl_w, ent_w):
    args = _unpack(floats, ints)
    check_label_range(labels, logits.shape[-1], args.ignore_index)
    fwd = registry.launcher(OP, backend, "fwd")
    return fwd(logits, labels, old, adv, ref, weight, args, grad_out, policy_w=policy_w, kl_w=kl_w, ent_w=ent_w)


@torch.library.custom_op("fastpo::policy_loss_fwd", mutates_args=())
def policy_loss_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
    ref: Optional[torch.Tensor], weight: torch.Tensor, floats: list[float], ints: list[int],
    backend: str, write_grad: bool, policy_w: Optional[torch.Tensor] = None,
    kl_w: Optional[torch.Tensor] = None, ent_w: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-token policy loss: ``(per_token_loss [N], logp [N], entropy [N], grad)``;
    ``grad`` is dL/dlogits (the logits' shape, contiguous) when ``write_grad``, else an empty
    tensor; L = sum_t weight * (policy_w * policy term) + kl_w * KL term - ent_w * entropy term
    (``policy_w`` None: 1; ``kl_w`` / ``ent_w`` None: ``weight``)."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if write_grad else None
    loss, logp, entropy = _fused_launch(logits, labels, old, adv, ref, weight, floats, ints, backend, grad,
                                        policy_w, kl_w, ent_w)
    return loss, logp, entropy, grad if write_grad else logits.new_empty(0)


@policy_loss_fwd_op.register_fake
def _(logits, labels, old, adv, ref, weight, floats, ints, backend, write_grad, policy_w=None, kl_w=None,
      ent_w=None):
    out = logits.new_empty(labels.shape[0], dtype=acc_dtype(logits.dtype))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if write_grad else logits.new_empty(0)
    return out, torch.empty_like(out), torch.empty_like(out), grad


@torch.library.custom_op("fastpo::policy_loss_fwd_inplace", mutates_args=("logits",))
def policy_loss_fwd_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
    ref: Optional[torch.Tensor], weight: torch.Tensor, floats: list[float], ints: list[int], backend: str,
    policy_w: Optional[torch.Tensor] = None, kl_w: Optional[torch.Tensor] = None,
    ent_w: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``policy_loss_fwd`` with the gradient written over ``logits`` (no second N x V buffer)."""
    loss, logp, entropy = _fused_launch(logits, labels, old, adv, ref, weight, floats, ints, backend, logits,
                                        policy_w, kl_w, ent_w)
    return loss, logp, entropy


@policy_loss_fwd_inplace_op.register_fake
def _(logits, labels, old, adv, ref, weight, floats, ints, backend, policy_w=None, kl_w=None, ent_w=None):
    out = logits.new_empty(labels.shape[0], dtype=acc_dtype(logits.dtype))
    return out, torch.empty_like(out), torch.empty_like(out)


def aggregation_weight(mask: torch.Tensor, config, num_tokens, num_sequences,
                       acc: torch.dtype = torch.float32, agg: str | None = None) -> torch.Tensor:
    """d loss / d per_token_loss of the aggregation ``agg`` (default ``config.agg``; its only
    formula: ``aggregate_ref``), in ``acc`` (float64 for float64 logits: a float32 weight would be
    off by ~1e-8 relative). ``torch.func.grad`` rather than ``torch.autograd.grad``: it traces
    under torch.compile."""

    def total(x):
        return aggregate_ref(x, mask, agg or config.agg, num_tokens=num_tokens,
                             num_sequences=num_sequences, agg_scale=config.agg_scale)

    return torch.func.grad(total)(torch.zeros(mask.shape, dtype=acc, device=mask.device))


def _two_phase(logits, labels, old, adv, ref, mask, config, backend, ignore_index,
               num_tokens, num_sequences, write_grad, inplace, extras):
    """Token forward op → reference loss on [B, T] → token backward op; returns the gradient."""
    shape = mask.shape
    logp, entropy, lse = token_logprobs_fwd_op(logits, labels, config.temperature, ignore_index, backend)

    def loss_of(lp, ent):
        loss, per_token, metrics = policy_loss_ref(
            lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=config,
            num_tokens=num_tokens, num_sequences=num_sequences, **extras._asdict(),
        )
        return loss, (loss, per_token, metrics)

    lp, ent = logp.view(shape), entropy.view(shape)
    if not write_grad:
        _, (loss, per_token, metrics) = loss_of(lp, ent)
        return loss, per_token, metrics, None
    (g_lp, g_h), (loss, per_token, metrics) = torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(lp, ent)
    g_lp = g_lp.reshape(-1).to(logp.dtype).contiguous()
    g_h = g_h.reshape(-1).to(logp.dtype).contiguous() if config.entropy_coef != 0.0 else None
    args = (logits, labels, lse, entropy, g_lp, g_h, config.temperature, ignore_index, backend)
    if inplace:
        token_logprobs_bwd_inplace_op(*args)
        return loss, per_token, metrics, logits
    return loss, per_token, metrics, token_logprobs_bwd_op(*args)


def _flat_weights(mask, config, num_tokens, num_sequences, acc, extras, kl_on):
    """(weight, policy_w, kl_w, ent_w) [N] for the fused kernel: the aggregation weight of the
    loss, the IS weights of the policy term, and the separate aggregation weights of the KL and
    entropy terms when ``kl_agg`` / ``entropy_agg`` are set (None: the same as ``weight``)."""
    flat = lambda t: t.reshape(-1).contiguous()  # noqa: E731
    weight = flat(aggregation_weight(mask, config, num_tokens, num_sequences, acc))
    policy_w = None
    if extras.policy_weights is not None:
        pw = extras.policy_weights.detach().to(acc)
        pw = pw.unsqueeze(-1).expand(mask.shape) if pw.dim() == 1 else pw
        policy_w = flat(torch.where(mask, pw, torch.zeros((), dtype=acc, device=pw.device)))
    aux = extras.aux_num_tokens
    kl_w = None
    if kl_on and config.kl_agg is not None:
        kl_w = flat(aggregation_weight(mask, config, aux, num_sequences, acc, agg=config.kl_agg))
    ent_w = None
    if config.entropy_coef != 0.0 and config.entropy_agg is not None:
        ent_w = flat(aggregation_weight(mask, config, aux, num_sequences, acc, agg=config.entropy_agg))
    return weight, policy_w, kl_w, ent_w


def _fused(logits, labels, old, adv, ref, mask, config, backend, ignore_index, num_tokens, num_sequences,
           write_grad, inplace, extras):
    shape = mask.shape
    acc = acc_dtype(logits.dtype)
    adv_tok = (adv.unsqueeze(-1).expand(shape) if adv.dim() == 1 else adv).to(acc).reshape(-1).contiguous()
    ref_flat = None if ref is None else ref.to(acc).reshape(-1).contiguous()
    args = PolicyKernelArgs.from_config(config, has_ref=ref is not None, ignore_index=ignore_index)
    weight, policy_w, kl_w, ent_w = _flat_weights(mask, config, num_tokens, num_sequences, acc, extras,
                                                  kl_on=args.kl_kind != 0)
    floats, ints = _pack(args)
    old_flat = old.to(acc).reshape(-1).contiguous()
    if write_grad and inplace:
        per_token, logp, entropy = policy_loss_fwd_inplace_op(
            logits, labels, old_flat, adv_tok, ref_flat, weight, floats, ints, backend, policy_w, kl_w, ent_w)
        grad = logits
    else:
        per_token, logp, entropy, grad = policy_loss_fwd_op(
            logits, labels, old_flat, adv_tok, ref_flat, weight, floats, ints, backend, write_grad,
            policy_w, kl_w, ent_w)
        grad = grad if write_grad else None
    per_token = per_token.view(shape)
    # the loss value and the metrics from the same definitions as the composed path, on [B, T]
    # (no N x V work); without separate KL / entropy aggregations the loss is the aggregate of
    # the kernel's own per-token loss
    ref_loss, _, metrics = policy_loss_ref(
        logp.view(shape), old, adv, mask, ref_logprobs=ref, entropy=entropy.view(shape),
        config=config, num_tokens=num_tokens, num_sequences=num_sequences, **extras._asdict(),
    )
    if kl_w is None and ent_w is None:
        loss = aggregate_ref(per_token, mask, config.agg, num_tokens=num_tokens,
                             num_sequences=num_sequences, agg_scale=config.agg_scale)
    else:
        loss = ref_loss
    return loss, per_token, metrics, grad


def fused_kernel_applies(config) -> bool:
    """The fused kernels know the token-local variants and features of ``PolicyKernelArgs``
    (ppo, cispo, sapo, pg; KL x ratio, IS weights, separate KL / entropy aggregations).
    Sequence-level features (gspo, gmpo, vespo, the off-policy mask, the top-entropy quantile)
    take the two-phase path."""
    from ..kernels.policy_args import VARIANT_CODES

    return (config.variant in VARIANT_CODES and config.off_policy_mask_threshold is None
            and config.top_entropy_quantile >= 1.0)


class PolicyExtras(NamedTuple):
    """The call-time arguments of the parity features (``policy_loss_ref``'s keywords)."""

    policy_weights: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    aux_num_tokens: object = None


def policy_loss_forward(logits, labels, old, adv, ref, mask, config, backend, ignore_index,
                        num_tokens, num_sequences, write_grad, inplace, extras: PolicyExtras = PolicyExtras()):
    """Dispatch: the fused kernel where it applies, else the two-phase path.
    Returns ``(loss, per_token_loss, metrics, grad or None)``."""
    if fused_kernel_applies(config) and backend in registry.backends_for(OP, logits.device):
        return _fused(logits, labels, old, adv, ref, mask, config, backend, ignore_index, num_tokens,
                      num_sequences, write_grad, inplace, extras)
    return _two_phase(logits, labels, old, adv, ref, mask, config, backend, ignore_index,
                      num_tokens, num_sequences, write_grad, inplace, extras)


class PolicyLossFunction(torch.autograd.Function):
    """Returns the scalar loss (differentiable in logits), the detached per-token loss and
    the metrics stacked in ``metric_keys`` order (detached)."""

    @staticmethod
    def forward(ctx, logits, labels, old, adv, ref, mask, config, backend, ignore_index,
                num_tokens, num_sequences, inplace_backward, metric_keys, extras):
        write_grad = bool(ctx.needs_input_grad[0])
        loss, per_token, metrics, grad = policy_loss_forward(
            logits, labels, old, adv, ref, mask, config, backend, ignore_index, num_tokens, num_sequences,
            write_grad, bool(inplace_backward), extras,
        )
        if grad is not None and inplace_backward:
            # the logits now hold the gradient: any other saved use of them must fail loudly
            torch.autograd.graph.increment_version(logits)
        ctx.grad = None if grad is None else GradBuffer(grad)
        stacked = torch.stack([metrics[k].float() for k in metric_keys])
        ctx.mark_non_differentiable(per_token, stacked)
        return loss, per_token, stacked

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token, grad_metrics):
        if grad_loss is None or ctx.grad is None:
            return (None,) * 14
        return (ctx.grad.scaled(grad_loss),) + (None,) * 13
