"""Verify cases for the fused policy_loss: loss and gradient against the float64 composed
reference (token_logprobs_ref in float64 -> policy_loss_ref), per backend and dtype.

Configs: GRPO-style ppo with clip-higher and a k3 KL penalty, GSPO (two-phase path on every
backend), CISPO with an entropy bonus, and the policy-parity features (fused kernel: sapo, pg,
TRL 1.16's default KL x ratio with vLLM IS weights; two-phase path: gmpo, vespo with IS weights,
OpenRLHF's gspo with a sequence gradient and token-mean KL, top-entropy / off-policy masks). Tolerances as DESIGN.md section 3: fp32 1e-5;
bf16 / fp16 values 1e-5 (fp32 accumulation of the upcast logits), gradients 1.5e-2 (rounded to
the logits' dtype, plus the backward's scaling by the upstream gradient).
"""
from __future__ import annotations

from typing import Iterator

import torch

import fastpo
from fastpo.config import PolicyLossConfig
from fastpo.ops import registry
from fastpo.reference import token_logprobs_ref
from fastpo.reference.policy_loss import policy_loss_ref

from . import DTYPES, Check, dtype_name, rel_err

OP = "policy_loss"
BACKEND_OP = "token_logprobs"  # the fused op runs on every backend that runs token_logprobs
UPSTREAM = 0.75  # a non-unit upstream gradient, as under gradient accumulation

CONFIGS = {
    "grpo-k3-clip-higher": PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.04, kl_estimator="k3",
                                            agg="seq-mean-token-mean"),
    "gspo": PolicyLossConfig(variant="gspo", clip_low=3e-4, clip_high=4e-4),
    "cispo-entropy": PolicyLossConfig(variant="cispo", clip_low=1.0, clip_high=4.0, entropy_coef=0.01,
                                      temperature=0.9),
    "sapo": PolicyLossConfig(variant="sapo", agg="seq-mean-token-mean"),
    "pg": PolicyLossConfig(variant="pg"),
    "gmpo": PolicyLossConfig(variant="gmpo", clip_low=0.33, clip_high=0.49, agg="seq-mean-token-mean"),
    "vespo+is": PolicyLossConfig(variant="vespo"),
    "trl-kl-x-ratio+is": PolicyLossConfig(kl_coef=0.04, kl_importance_weighted=True),
    "openrlhf-gspo-seq-grad": PolicyLossConfig(variant="gspo", seq_ratio_grad="sequence", kl_coef=0.01,
                                               kl_clamp=10.0, kl_agg="token-mean", agg="seq-mean-token-mean"),
    "masks": PolicyLossConfig(top_entropy_quantile=0.5, off_policy_mask_threshold=0.05, entropy_coef=0.01,
                              entropy_agg="token-mean"),
}
WITH_IS_WEIGHTS = ("vespo+is", "trl-kl-x-ratio+is")
# VESPO's weight exp(lam + k log w - lam w) of a sequence-summed log-ratio amplifies fp32 rounding
# of the log-probs (the torch backend, fp32 PyTorch itself, shows the same 1.2e-5): a wider loss bound.
LOSS_TOL = {"vespo+is": 5e-5}


def _shapes(device: torch.device) -> list[tuple[int, int, int]]:
    if device.type == "cuda":
        return [(8, 1024, 32000), (4, 1024, 128256), (2, 512, 151936)]
    return [(2, 4, 4099), (2, 4, 32000)]  # the interpreter is slow: a multi-block row, a real vocabulary


def _batch(b: int, t: int, v: int, gen: torch.Generator):
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, -1] = -100
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, t // 2:] = False
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits, labels)
    noise = lambda: 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64)  # noqa: E731
    old, ref = (lp + noise()).float(), (lp + noise()).float()
    adv = torch.randn(b, generator=gen, dtype=torch.float64).float()
    return logits, labels, mask, old, adv, ref


def _reference(logits, labels, mask, old, adv, ref, config, weights=None):
    x = logits.double().requires_grad_()
    lp, ent = token_logprobs_ref(x, labels, temperature=config.temperature)
    loss, _, _ = policy_loss_ref(lp, old, adv, mask & (labels != -100), ref_logprobs=ref, entropy=ent,
                                 config=config, policy_weights=weights)
    (grad,) = torch.autograd.grad(loss * UPSTREAM, x)
    return loss, grad


def checks(device: torch.device) -> Iterator[Check]:
    gen = torch.Generator().manual_seed(0)
    for b, t, v in _shapes(device):
        base, labels, mask, old, adv, ref = (x.to(device) for x in _batch(b, t, v, gen))
        is_w = (0.5 + torch.rand(b, t, generator=gen)).to(device)
        for dtype in DTYPES:
            logits = base.to(dtype)
            for name, config in CONFIGS.items():
                w = is_w if name in WITH_IS_WEIGHTS else None
                loss_r, grad_r = _reference(logits, labels, mask, old, adv, ref, config, w)
                for backend in registry.backends_for(BACKEND_OP, device):
                    x = logits.clone().requires_grad_()
                    out = fastpo.policy_loss(x, labels, old, adv, mask=mask, ref_logprobs=ref, config=config,
                                             policy_weights=w, backend=backend)
                    (grad,) = torch.autograd.grad(out.loss * UPSTREAM, x)
                    common = dict(op=OP, backend=backend, dtype=dtype_name(dtype), shape=f"{b}x{t}x{v} {name}")
                    tol_loss = LOSS_TOL.get(name, 1e-5)
                    yield Check(quantity="loss", error=rel_err(out.loss, loss_r), tol=tol_loss, **common)
                    tol_grad = 1e-5 if dtype == torch.float32 else 1.5e-2
                    yield Check(quantity="grad", error=rel_err(grad, grad_r), tol=tol_grad, **common)
