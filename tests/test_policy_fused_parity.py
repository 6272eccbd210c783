"""The fused policy kernel's token-local parity features (issue 9), on every backend, against the
float64 composed path (token_logprobs -> policy_loss_from_logprobs): sapo and pg variants, KL x
ratio (TRL's use_bias_correction_kl), importance-sampling policy_weights ([B] and [B, T]), and
separate KL / entropy aggregations with aux_num_tokens. Values, per-token losses, metrics and
gradients (random upstream scalar), masks, an odd and a multi-block vocabulary, in place."""
from __future__ import annotations

import math

import pytest
import torch

import fastpo
import fastpo.ops.policy_loss as ops
from fastpo import PolicyLossConfig as C
from fastpo.functional.policy_loss import policy_loss_from_logprobs
from tests.conftest import backend_params, make_labels, make_logits, rel_err

CONFIGS = {
    "sapo": C(variant="sapo", sapo_tau_pos=0.7, sapo_tau_neg=2.0, entropy_coef=0.03),
    "pg-kl3-weighted": C(variant="pg", kl_coef=0.2, kl_importance_weighted=True, agg="seq-mean-token-sum"),
    "ppo-k3-weighted": C(kl_coef=0.1, kl_importance_weighted=True, logratio_clamp=0.25, dual_clip=3.0,
                         agg="seq-mean-token-mean"),
    "ppo-k2+-weighted": C(kl_coef=0.3, kl_estimator="k2+", kl_importance_weighted=True, ratio_cap=1.1),
    "cispo-k1-weighted": C(variant="cispo", clip_high=0.5, kl_coef=0.1, kl_estimator="k1",
                           kl_importance_weighted=True),
    "separate-aggs": C(agg="seq-mean-token-mean", kl_coef=0.1, kl_agg="token-mean", entropy_coef=0.02,
                       entropy_agg="seq-mean-token-sum"),
}
FUSED = backend_params("token_logprobs")


def _inputs(b, t, v, dtype, device, weights_shape):
    logits = make_logits((b, t, v), dtype, device, seed=3, scale=2.0)
    labels = make_labels((b, t), v, device, ignore_frac=0.0, seed=4)
    labels[1, 2] = -100
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[0, -1] = False
    g = torch.Generator().manual_seed(5)
    old = (torch.randn(b, t, generator=g) * 0.3 - math.log(v)).to(device)
    ref = old + 0.3 * torch.randn(b, t, generator=g).to(device)
    adv = torch.randn(b, t, generator=g).to(device)
    w = (torch.rand(weights_shape(b, t), generator=g) + 0.5).to(device)
    return logits, labels, mask, old, ref, adv, w


@pytest.fixture
def launches(monkeypatch):
    calls = []
    real = ops._fused_launch

    def spy(*args):
        calls.append(args[-3:])
        return real(*args)

    monkeypatch.setattr(ops, "_fused_launch", spy)
    return calls


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wshape", ["B", "BT"])
def test_fused_features_match_the_float64_composed_path(device, backend, name, dtype, wshape, launches):
    cfg = CONFIGS[name]
    b, t, v = 2, 3, 37
    logits, labels, mask, old, ref, adv, w = _inputs(
        b, t, v, dtype, device, (lambda b, t: (b,)) if wshape == "B" else (lambda b, t: (b, t)))
    aux = 4 if cfg.kl_agg or cfg.entropy_agg else None
    kw = dict(ref_logprobs=ref, config=cfg, policy_weights=w, aux_num_tokens=aux, num_tokens=5)
    x = logits.clone().requires_grad_()
    out = fastpo.policy_loss(x, labels, old, adv, mask=mask, backend=backend, **kw)
    up = 0.37 + torch.rand(()).item()
    (gx,) = torch.autograd.grad(out.loss * up, x)
    if backend != "torch":
        assert len(launches) == 1  # the fused kernel ran (not the two-phase path)
        assert launches[0][0] is not None  # with the IS weights
    y = logits.double().clone().requires_grad_()
    lp, ent = fastpo.token_logprobs(y, labels, temperature=cfg.temperature, return_entropy=True, backend="torch")
    want = policy_loss_from_logprobs(lp, old.double(), adv.double(), mask & (labels != -100), entropy=ent,
                                     **{**kw, "ref_logprobs": ref.double(), "policy_weights": w.double()})
    (gy,) = torch.autograd.grad(want.loss * up, y)
    # values accumulate in fp32 (fp64) from the same upcast logits; bf16 gradients are stored in bf16
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    grad_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert rel_err(out.loss, want.loss) <= tol
    assert rel_err(out.per_token_loss, want.per_token_loss) <= tol
    assert rel_err(gx, gy) <= grad_tol
    assert not gx[1, 2].any() and not gx[0, -1].any()  # ignored label, masked token: exact zeros
    for k in out.metrics:
        torch.testing.assert_close(out.metrics[k].double(), want.metrics[k].double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("name", ["sapo", "ppo-k3-weighted", "separate-aggs"])
def test_multi_block_vocabulary_and_in_place(device, backend, name):
    """V = 4099 spans two Triton blocks; the in-place path leaves the same gradient in the logits."""
    cfg = CONFIGS[name]
    b, t, v = 2, 3, 4099
    logits, labels, mask, old, ref, adv, w = _inputs(b, t, v, torch.float32, device, lambda b, t: (b, t))
    aux = 7 if cfg.kl_agg or cfg.entropy_agg else None
    kw = dict(ref_logprobs=ref, config=cfg, policy_weights=w, aux_num_tokens=aux)
    x = logits.clone().requires_grad_()
    out = fastpo.policy_loss(x, labels, old, adv, mask=mask, backend=backend, **kw)
    (gx,) = torch.autograd.grad(out.loss, x)
    y = logits.double().clone().requires_grad_()
    lp, ent = fastpo.token_logprobs(y, labels, temperature=cfg.temperature, return_entropy=True, backend="torch")
    want = policy_loss_from_logprobs(lp, old.double(), adv.double(), mask & (labels != -100), entropy=ent,
                                     **{**kw, "ref_logprobs": ref.double(), "policy_weights": w.double()})
    (gy,) = torch.autograd.grad(want.loss, y)
    assert rel_err(out.loss, want.loss) <= 1e-5 and rel_err(gx, gy) <= 1e-5
    leaf = logits.clone().requires_grad_()
    buf = leaf.clone()
    out_ip = fastpo.policy_loss(buf, labels, old, adv, mask=mask, backend=backend, inplace_backward=True, **kw)
    (g_ip,) = torch.autograd.grad(out_ip.loss, leaf)
    assert torch.equal(out_ip.loss, out.loss) and torch.equal(g_ip, gx)


@pytest.mark.parametrize("device,backend", FUSED)
def test_weights_do_not_leak_into_the_kl_and_entropy_terms(device, backend):
    """policy_weights multiply the policy term only: with a zero policy term (A = 0) the loss
    and gradient do not depend on them."""
    cfg = C(kl_coef=0.2, kl_importance_weighted=True, entropy_coef=0.05)
    b, t, v = 2, 3, 37
    logits, labels, mask, old, ref, adv, w = _inputs(b, t, v, torch.float32, device, lambda b, t: (b, t))
    zero_adv = torch.zeros_like(adv)
    grads = []
    for weights in (w, 3.0 * w, None):
        x = logits.clone().requires_grad_()
        out = fastpo.policy_loss(x, labels, old, zero_adv, mask=mask, ref_logprobs=ref, config=cfg,
                                 policy_weights=weights, backend=backend)
        grads.append((out.loss.detach(), torch.autograd.grad(out.loss, x)[0]))
    for loss, grad in grads[1:]:
        assert torch.equal(loss, grads[0][0]) and torch.equal(grad, grads[0][1])
