"""policy_loss from logits: the fused kernel path, the two-phase path, autograd.

Two ways to produce the same numbers as ``policy_loss_from_logprobs(token_logprobs(...))``:

* fused (triton, cuda and cpu backends; variants "ppo" and "cispo"): one kernel
  computes, per token, the log-prob, entropy, ratio, clipped surrogate, KL and
  entropy terms (csrc/policy_math.h mirrors the Triton math) and writes
  dL/dlogits during the forward (the aggregation weight of every token is known
  beforehand: it is the derivative of the one aggregation formula,
  ``aggregate_ref``). Traffic: read the logits twice, write the gradient once.
* two-phase (every backend; GSPO everywhere, since its sequence ratio needs every
  token of the sequence first): phase 1 is the token_logprobs forward kernel
  (logp, entropy, lse); the per-token loss and its derivatives in logp and entropy
  are evaluated by the reference itself on the [B, T] log-probs (cheap, and equal
  to the composed path by construction); phase 2 is the token_logprobs backward
  kernel, which writes dL/dlogits. Same traffic, no N x V intermediate.

Either way the gradient exists when the forward returns; ``PolicyLossFunction``'s
backward only scales it by the upstream scalar (skipped when that is exactly 1).
"""
from __future__ import annotations

import torch

from ..kernels.policy_args import PolicyKernelArgs
from ..reference._dtypes import acc_dtype
from ..reference.policy_loss import aggregate_ref, policy_loss_ref
from . import registry

OP = "policy_loss"

registry.register(OP, "triton", fwd="fastpo.kernels.policy_loss:policy_loss_fwd")
registry.register(OP, "cpu", fwd="fastpo.kernels.cpp:policy_loss_fwd")
registry.register(OP, "cuda", fwd="fastpo.kernels.cpp:policy_loss_fwd")


def aggregation_weight(mask: torch.Tensor, config, num_tokens, num_sequences,
                       acc: torch.dtype = torch.float32) -> torch.Tensor:
    """d loss / d per_token_loss of the aggregation (its only formula: ``aggregate_ref``), in
    ``acc`` (float64 for float64 logits: a float32 weight would be off by ~1e-8 relative)."""
    with torch.enable_grad():
        x = torch.zeros(mask.shape, dtype=acc, device=mask.device, requires_grad=True)
        total = aggregate_ref(x, mask, config.agg, num_tokens=num_tokens,
                              num_sequences=num_sequences, agg_scale=config.agg_scale)
        (weight,) = torch.autograd.grad(total, x)
    return weight


def _two_phase(logits, labels, old, adv, ref, mask, config, backend, ignore_index,
               num_tokens, num_sequences, grad_out):
    """Token forward kernel → reference loss on [B, T] → token backward kernel."""
    shape = mask.shape
    fwd = registry.launcher("token_logprobs", backend, "fwd")
    logp, entropy, lse = fwd(logits, labels, config.temperature, ignore_index)
    with torch.enable_grad():
        lp = logp.detach().view(shape).requires_grad_()
        ent = entropy.detach().view(shape).requires_grad_()
        loss, per_token, metrics = policy_loss_ref(
            lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=config,
            num_tokens=num_tokens, num_sequences=num_sequences,
        )
        if grad_out is not None:
            g_lp, g_h = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    if grad_out is not None:
        g_lp = torch.zeros_like(logp) if g_lp is None else g_lp.reshape(-1).to(logp.dtype).contiguous()
        g_h = None if g_h is None else g_h.reshape(-1).to(logp.dtype).contiguous()
        bwd = registry.launcher("token_logprobs", backend, "bwd")
        bwd(logits, labels, lse, entropy, g_lp, g_h, config.temperature, ignore_index, grad_out)
    return loss.detach(), per_token.detach(), metrics


def _fused(logits, labels, old, adv, ref, mask, config, backend, ignore_index, num_tokens, num_sequences,
           grad_out):
    fwd = registry.launcher(OP, backend, "fwd")
    shape = mask.shape
    acc = acc_dtype(logits.dtype)
    adv_tok = (adv.unsqueeze(-1).expand(shape) if adv.dim() == 1 else adv).to(acc).reshape(-1).contiguous()
    ref_flat = None if ref is None else ref.to(acc).reshape(-1).contiguous()
    weight = aggregation_weight(mask, config, num_tokens, num_sequences, acc).reshape(-1).contiguous()
    args = PolicyKernelArgs.from_config(config, has_ref=ref is not None, ignore_index=ignore_index)
    per_token, logp, entropy = fwd(
        logits, labels, old.to(acc).reshape(-1).contiguous(), adv_tok, ref_flat, weight, args, grad_out
    )
    per_token = per_token.view(shape)
    loss = aggregate_ref(per_token, mask, config.agg, num_tokens=num_tokens,
                         num_sequences=num_sequences, agg_scale=config.agg_scale)
    # metrics from the same definitions as the composed path, on [B, T] (no N x V work)
    _, _, metrics = policy_loss_ref(
        logp.view(shape), old, adv, mask, ref_logprobs=ref, entropy=entropy.view(shape),
        config=config, num_tokens=num_tokens, num_sequences=num_sequences,
    )
    return loss, per_token, metrics


def policy_loss_forward(logits, labels, old, adv, ref, mask, config, backend, ignore_index,
                        num_tokens, num_sequences, grad_out):
    """Dispatch: the fused kernel where it applies, else the two-phase path."""
    if config.variant != "gspo" and backend in registry.backends_for(OP, logits.device):
        return _fused(logits, labels, old, adv, ref, mask, config, backend, ignore_index, num_tokens,
                      num_sequences, grad_out)
    return _two_phase(logits, labels, old, adv, ref, mask, config, backend, ignore_index,
                      num_tokens, num_sequences, grad_out)


class PolicyLossFunction(torch.autograd.Function):
    """Returns the scalar loss (differentiable in logits), the detached per-token loss and
    the metrics stacked in ``metric_keys`` order (detached)."""

    @staticmethod
    def forward(ctx, logits, labels, old, adv, ref, mask, config, backend, ignore_index,
                num_tokens, num_sequences, inplace_backward, metric_keys):
        grad_out = None
        if ctx.needs_input_grad[0]:
            grad_out = logits if inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        loss, per_token, metrics = policy_loss_forward(
            logits, labels, old, adv, ref, mask, config, backend, ignore_index, num_tokens, num_sequences, grad_out
        )
        if grad_out is not None and inplace_backward:
            # the logits now hold the gradient: any other saved use of them must fail loudly
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad_out)
        stacked = torch.stack([metrics[k].float() for k in metric_keys])
        ctx.mark_non_differentiable(per_token, stacked)
        return loss, per_token, stacked

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token, grad_metrics):
        (grad,) = ctx.saved_tensors
        if grad_loss is None or grad is None:
            return (None,) * 13
        scale = float(grad_loss)  # syncs, as any check for "exactly 1" would
        if scale != 1.0:
            # a Python scalar is applied at fp32 (opmath) precision; ``grad_loss.to(grad.dtype)``
            # would first round it to bf16 / fp16 (1/3 -> 0.33398, a 0.2% bias on the gradient).
            # The bf16 / fp16 gradient is still rounded twice (forward, here): <= 1 ulp more.
            grad = grad.mul_(scale)
        return (grad,) + (None,) * 12
