"""The fused policy loss is a torch.library custom op (issue 8, defect 6): opcheck-clean fake
kernels, torch.compile(fullgraph=True)-traceable, visible to the profiler, and its label-range
check runs inside the op, so it also holds under torch.compile (defect 4)."""
from __future__ import annotations

import pytest
import torch

import fastpo
from fastpo.kernels.policy_args import PolicyKernelArgs
from fastpo.ops import registry
from fastpo.ops.policy_loss import _pack, policy_loss_fwd_inplace_op, policy_loss_fwd_op

BACKENDS = [b for b in ("cpu", "triton") if b in registry.backends_for("policy_loss", torch.device("cpu"))]


def _op_args(n=4, v=40, with_extras=False):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g)
    labels = torch.tensor([1, -100, 39, 7])[:n]
    old, adv, ref = (torch.randn(n, generator=g) - 3.0 for _ in range(3))
    weight = torch.rand(n, generator=g)
    cfg = fastpo.PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, kl_importance_weighted=with_extras)
    floats, ints = _pack(PolicyKernelArgs.from_config(cfg, has_ref=True, ignore_index=-100))
    extras = (torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g))
    return logits, labels, old, adv, ref, weight, floats, ints, extras if with_extras else (None, None, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "weights"])
@pytest.mark.parametrize("write_grad", [False, True])
def test_opcheck(backend, with_extras, write_grad):
    logits, labels, old, adv, ref, weight, floats, ints, extras = _op_args(with_extras=with_extras)
    torch.library.opcheck(policy_loss_fwd_op,
                          (logits, labels, old, adv, ref, weight, floats, ints, backend, write_grad, *extras))
    torch.library.opcheck(policy_loss_fwd_inplace_op,
                          (logits.clone(), labels, old, adv, ref, weight, floats, ints, backend, *extras))


def _batch(v=48):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, v, generator=g)
    labels = torch.randint(0, v, (2, 4), generator=g)
    old = torch.randn(2, 4, generator=g) - 4.0
    adv = torch.tensor([1.0, -0.5])
    return logits, labels, old, adv


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_equals_eager_and_profiler_sees_the_op(backend):
    logits, labels, old, adv = _batch()
    cfg = fastpo.PolicyLossConfig(entropy_coef=0.01)

    def loss(z):
        return fastpo.policy_loss(z[:, :-1], labels, old, adv, config=cfg, backend=backend).loss * 1.3

    x = logits.clone().requires_grad_()
    (g_e,) = torch.autograd.grad(loss(x), x)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_()
    (g_c,) = torch.autograd.grad(compiled(x), x)
    torch.testing.assert_close(g_c, g_e, rtol=1e-6, atol=1e-7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        x = logits.clone().requires_grad_()
        loss(x).backward()
    names = {e.key for e in prof.key_averages()}
    assert "fastpo::policy_loss_fwd" in names, sorted(n for n in names if "fastpo" in n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_raises_under_compile(backend):
    logits, labels, old, adv = _batch()
    labels[1, 2] = logits.shape[-1]  # == V: out of range

    def loss(z):
        return fastpo.policy_loss(z[:, :-1], labels, old, adv, backend=backend).loss

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"labels must lie in \[0, 48\)"):
        compiled(logits.clone().requires_grad_())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rescale_grad_opcheck_and_repeated_backward(dtype):
    from fastpo.ops.grad_scale import GradBuffer, rescale_grad_op

    grad = torch.randn(3, 7).to(dtype)
    torch.library.opcheck(rescale_grad_op, (grad.clone(), torch.tensor(0.5), torch.ones(1)))  # applied: [1]
    buf = GradBuffer(grad.clone())
    first = buf.scaled(torch.tensor(2.0)).clone()
    second = buf.scaled(torch.tensor(3.0))  # a second backward (retain_graph): 3x the original
    torch.testing.assert_close(first.float(), (grad.float() * 2.0).to(dtype).float())
    torch.testing.assert_close(second.float(), (grad.float() * 3.0).to(dtype).float(), rtol=1e-2, atol=1e-2)
