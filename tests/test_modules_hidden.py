"""``PolicyLoss.forward_hidden`` / ``DPOLoss.forward_hidden``: the module path from hidden states
and an ``nn.Linear`` head equals the functional linear ops and the logits-level module call."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpo


def _inputs(b=2, t=5, h=8, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    head = nn.Linear(h, v)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g))
        head.bias.copy_(torch.randn(v, generator=g) * 0.1)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, 0] = -100
    return hidden, head, labels


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_policy_forward_hidden_equals_logits_path(backend):
    if backend not in fastpo.ops.registry.backends_for("policy_loss", torch.device("cpu")) and backend != "torch":
        pytest.skip("cpu module not built")
    hidden, head, labels = _inputs()
    old = torch.full(labels.shape, -3.5)
    adv = torch.tensor([1.0, -0.5])
    module = fastpo.PolicyLoss(kl_coef=0.0, entropy_coef=0.01, backend=backend)
    out = module.forward_hidden(hidden, head, labels, old, adv)
    grads = torch.autograd.grad(out.loss, (head.weight, head.bias))
    logits = head(hidden)
    ref = module.forward_logits(logits, labels, old, adv)
    ref_grads = torch.autograd.grad(ref.loss, (head.weight, head.bias))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dpo_forward_hidden_equals_logits_path():
    hidden, head, labels = _inputs(b=4)
    ref_c, ref_r = torch.tensor([-20.0, -21.0]), torch.tensor([-22.0, -19.5])
    module = fastpo.DPOLoss(beta=0.1, loss_type="sigmoid")
    out = module.forward_hidden(hidden, head, labels, ref_c, ref_r)
    (gw,) = torch.autograd.grad(out.loss, head.weight)
    ref = module(head(hidden), labels, ref_c, ref_r)
    (gw_ref,) = torch.autograd.grad(ref.loss, head.weight)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-6)


def test_head_must_be_linear_or_weight():
    hidden, head, labels = _inputs()
    with pytest.raises(TypeError, match="nn.Linear or a weight"):
        fastpo.PolicyLoss().forward_hidden(hidden, "head", labels, torch.zeros(labels.shape), torch.ones(2))
    with pytest.raises(ValueError, match="bias only with a bare weight"):
        fastpo.PolicyLoss().forward_hidden(hidden, head, labels, torch.zeros(labels.shape), torch.ones(2),
                                           bias=head.bias)
