"""dpo_loss_from_logprobs against an oracle re-derived here from TRL's formulas.

The oracle below is written independently of fastpo.reference (softplus instead
of logsigmoid, TRL <= 0.28's "logits = pi_logratios - ref_logratios" ordering,
IPO on pre-normalised log-probs as TRL's old concatenated_forward did), always
in float64, so a transcription slip in either copy shows up as a mismatch.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastpo.functional.dpo_loss import DPOOutput, dpo_loss_from_logprobs
from fastpo.modules.dpo import DPOLoss
from fastpo.reference.dpo_loss import LENGTH_NORMALIZED, LOSS_TYPES, dpo_loss_ref

ALL_TYPES = [
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard",
    "nca_pair", "apo_zero", "apo_down", "exo_pair", "sigmoid_norm", "simpo",
]
SMOOTHED = ["sigmoid", "robust", "exo_pair", "simpo"]  # the types that read label_smoothing


def _nls(x):  # -log sigmoid(x)
    return F.softplus(-x)


def oracle(c, r, rc, rr, lc, lr, *, beta, loss_type, ls=0.0, gamma=0.0):
    """Per-pair losses and rewards in float64, transcribed from TRL (see module docstring)."""
    c, r = c.double(), r.double()
    if loss_type == "simpo":  # TRL CPOTrainer: logps averaged, logits - simpo_gamma / beta
        ac, ar = c / lc.double(), r / lr.double()
        logits = (ac - ar) - gamma / beta
        losses = (1 - ls) * _nls(beta * logits) + ls * _nls(-beta * logits)
        return losses, beta * ac, beta * ar
    rc, rr = rc.double(), rr.double()
    if loss_type in ("ipo", "sigmoid_norm"):
        lc, lr = lc.double(), lr.double()
        logits = (c / lc - r / lr) - (rc / lc - rr / lr)
    else:
        logits = (c - r) - (rc - rr)
    cw, rw = beta * (c - rc), beta * (r - rr)  # chosen / rejected rewards
    if loss_type == "sigmoid":
        losses = (1 - ls) * _nls(beta * logits) + ls * _nls(-beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.clamp(1 - beta * logits, min=0)
    elif loss_type == "robust":
        losses = ((1 - ls) * _nls(beta * logits) - ls * _nls(-beta * logits)) / (1 - 2 * ls)
    elif loss_type == "bco_pair":
        losses = _nls(cw) + _nls(-rw)
    elif loss_type == "sppo_hard":
        losses = ((c - rc) - 0.5 / beta) ** 2 + ((r - rr) + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        losses = _nls(cw) + 0.5 * _nls(-cw) + 0.5 * _nls(-rw)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(cw) + torch.sigmoid(rw)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(cw) + 1 - torch.sigmoid(beta * ((c - rc) - (r - rr)))
    elif loss_type == "exo_pair":
        eps = ls if ls != 0 else 1e-3
        z = beta * logits
        losses = torch.sigmoid(z) * (-_nls(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (-_nls(-z) - math.log(eps))
    elif loss_type == "sigmoid_norm":
        losses = _nls(beta * logits)
    else:
        raise AssertionError(loss_type)
    return losses, cw, rw


def make_inputs(batch=7, dtype=torch.float64, seed=0, float_lengths=False):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 40, (batch,), generator=g)
    lr = torch.randint(1, 40, (batch,), generator=g)
    # Sums of token log-probs: roughly -0.8 per token, policy and reference a few nats apart.
    c = -0.8 * lc - torch.rand(batch, generator=g, dtype=torch.float64) * 3
    r = -0.8 * lr - torch.rand(batch, generator=g, dtype=torch.float64) * 3
    rc = c + torch.randn(batch, generator=g, dtype=torch.float64) * 2
    rr = r + torch.randn(batch, generator=g, dtype=torch.float64) * 2
    if float_lengths:
        lc, lr = lc.double(), lr.double()
    return [t.to(dtype) for t in (c, r, rc, rr)] + [lc, lr]


def tols(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def test_loss_types_cover_design():
    assert set(LOSS_TYPES) == set(ALL_TYPES)
    assert LENGTH_NORMALIZED == {"ipo", "sigmoid_norm", "simpo"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.1, 2.0])  # typical DPO beta; typical SimPO / DPO-norm beta
@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_values_and_grads(loss_type, beta, dtype):
    c, r, rc, rr, lc, lr = make_inputs(dtype=dtype, seed=ALL_TYPES.index(loss_type))
    leaves = [t.clone().requires_grad_(True) for t in (c, r, rc, rr)]
    out = dpo_loss_from_logprobs(
        *leaves, beta=beta, loss_type=loss_type, gamma=0.7, chosen_lengths=lc, rejected_lengths=lr, reduction="none"
    )
    assert out.loss.dtype == dtype and out.loss.shape == (7,)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (c, r, rc, rr)]
    exp, exp_cw, exp_rw = oracle(*ref_leaves, lc, lr, beta=beta, loss_type=loss_type, gamma=0.7)
    torch.testing.assert_close(out.loss.double(), exp.detach(), **tols(dtype))
    torch.testing.assert_close(out.chosen_rewards.double(), exp_cw.detach(), **tols(dtype))
    torch.testing.assert_close(out.rejected_rewards.double(), exp_rw.detach(), **tols(dtype))

    upstream = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wrt = leaves[:2] if loss_type == "simpo" else leaves  # simpo never reads the reference
    got = torch.autograd.grad(out.loss, wrt, upstream.to(dtype))
    want = torch.autograd.grad(exp, ref_leaves[: len(wrt)], upstream)
    for g_got, g_want in zip(got, want):
        assert g_got.dtype == dtype
        torch.testing.assert_close(g_got.double(), g_want, **tols(dtype))


@pytest.mark.parametrize("ls", [0.1, 0.3])
@pytest.mark.parametrize("loss_type", SMOOTHED)
def test_label_smoothing(loss_type, ls):
    c, r, rc, rr, lc, lr = make_inputs(seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (c, r, rc, rr)]
    kw = dict(beta=0.5, loss_type=loss_type, gamma=0.3, chosen_lengths=lc, rejected_lengths=lr)
    out = dpo_loss_from_logprobs(*leaves, label_smoothing=ls, reduction="sum", **kw)
    ref_leaves = [t.clone().requires_grad_(True) for t in (c, r, rc, rr)]
    exp = oracle(*ref_leaves, lc, lr, beta=0.5, loss_type=loss_type, ls=ls, gamma=0.3)[0].sum()
    torch.testing.assert_close(out.loss, exp)
    n = 2 if loss_type == "simpo" else 4
    for a, b in zip(torch.autograd.grad(out.loss, leaves[:n]), torch.autograd.grad(exp, ref_leaves[:n])):
        torch.testing.assert_close(a, b)
    # smoothing must actually change the value
    plain = dpo_loss_from_logprobs(c, r, rc, rr, reduction="sum", **kw).loss
    assert not torch.allclose(plain, out.loss.detach())


def test_exo_pair_default_epsilon():
    c, r, rc, rr, _, _ = make_inputs(seed=4)
    a = dpo_loss_from_logprobs(c, r, rc, rr, loss_type="exo_pair", label_smoothing=0.0, reduction="none").loss
    b = dpo_loss_from_logprobs(c, r, rc, rr, loss_type="exo_pair", label_smoothing=1e-3, reduction="none").loss
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_known_values():
    z = torch.zeros(3, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.long)
    # Policy == reference: DPO loss is log 2, IPO is (1/(2 beta))^2, hinge is 1.
    assert torch.allclose(dpo_loss_from_logprobs(z, z, z, z).loss, torch.tensor(math.log(2), dtype=torch.float64))
    ipo = dpo_loss_from_logprobs(z, z, z, z, beta=0.25, loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)
    assert torch.allclose(ipo.loss, torch.tensor(4.0, dtype=torch.float64))
    assert dpo_loss_from_logprobs(z, z, z, z, loss_type="hinge").loss.item() == 1.0
    # IPO normalises by length: doubling every length halves the log-ratio difference.
    c = torch.tensor([-4.0], dtype=torch.float64)
    r = torch.tensor([-8.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    two = torch.tensor([2])
    out = dpo_loss_from_logprobs(c, r, zero, zero, beta=0.5, loss_type="ipo", chosen_lengths=two, rejected_lengths=two)
    assert math.isclose(out.loss.item(), (-2.0 + 4.0 - 1.0) ** 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "apo_down"])
def test_reductions(loss_type):
    c, r, rc, rr, lc, lr = make_inputs(seed=5, float_lengths=True)  # float lengths accepted too
    kw = dict(beta=0.2, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    per = dpo_loss_from_logprobs(c, r, rc, rr, reduction="none", **kw)
    mean = dpo_loss_from_logprobs(c, r, rc, rr, reduction="mean", **kw)
    total = dpo_loss_from_logprobs(c, r, rc, rr, reduction="sum", **kw)
    assert mean.loss.shape == () and total.loss.shape == ()
    torch.testing.assert_close(mean.loss, per.loss.mean())
    torch.testing.assert_close(total.loss, per.loss.sum())
    assert per.accuracy.shape == (7,) and mean.accuracy.shape == () and total.accuracy.shape == ()
    torch.testing.assert_close(mean.accuracy, per.accuracy.mean())
    torch.testing.assert_close(total.accuracy, per.accuracy.mean())
    for o in (mean, total):  # rewards and margins are per pair whatever the reduction
        torch.testing.assert_close(o.chosen_rewards, per.chosen_rewards)
        torch.testing.assert_close(o.margins, per.margins)


def test_rewards_margins_accuracy_detached():
    c, r, rc, rr, lc, lr = make_inputs(seed=6)
    c.requires_grad_(True)
    r.requires_grad_(True)
    out = dpo_loss_from_logprobs(c, r, rc, rr, beta=0.3, reduction="none")
    assert isinstance(out, DPOOutput)
    assert out.loss.requires_grad
    for t in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracy):
        assert not t.requires_grad and t.shape == (7,)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (c - rc).detach())
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (r - rr).detach())
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)
    torch.testing.assert_close(out.accuracy, (out.margins > 0).double())
    # ipo / sigmoid_norm log the un-normalised rewards, as TRL does
    ipo = dpo_loss_from_logprobs(c, r, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(ipo.chosen_rewards, out.chosen_rewards)


def test_simpo_reference_free():
    c, r, rc, rr, lc, lr = make_inputs(seed=7)
    kw = dict(beta=2.0, loss_type="simpo", gamma=0.5, chosen_lengths=lc, rejected_lengths=lr, reduction="none")
    a = dpo_loss_from_logprobs(c, r, None, None, **kw)
    b = dpo_loss_from_logprobs(c, r, rc, rr, **kw)  # references are ignored
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.chosen_rewards, 2.0 * c / lc)
    torch.testing.assert_close(a.rejected_rewards, 2.0 * r / lr)
    # gamma is the margin itself: princeton-nlp/SimPO writes it as beta * gamma_beta_ratio
    gamma_beta_ratio = 0.5 / 2.0
    expected = -F.logsigmoid(2.0 * ((c / lc - r / lr) - gamma_beta_ratio))
    torch.testing.assert_close(a.loss, expected)


@pytest.mark.parametrize("loss_type", [t for t in ALL_TYPES if t != "simpo"])
def test_reference_required(loss_type):
    c, r, rc, rr, lc, lr = make_inputs()
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss_from_logprobs(c, r, None, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss_from_logprobs(c, r, rc, None, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)


@pytest.mark.parametrize("loss_type", sorted(LENGTH_NORMALIZED))
def test_zero_length_is_an_error_for_normalised_types(loss_type):
    c, r, rc, rr, lc, lr = make_inputs()
    lr[2] = 0
    with pytest.raises(ValueError, match=r"rejected_lengths.*\[2\].*no completion tokens"):
        dpo_loss_from_logprobs(c, r, rc, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss_from_logprobs(c, r, rc, rr, loss_type=loss_type, rejected_lengths=lr)


@pytest.mark.parametrize("loss_type", [t for t in ALL_TYPES if t not in LENGTH_NORMALIZED])
def test_zero_length_is_defined_for_sum_types(loss_type):
    # An empty completion has log-prob sum 0 for policy and reference: a finite loss, finite gradient.
    c, r, rc, rr, lc, lr = make_inputs()
    c[0] = rc[0] = 0.0
    lc[0] = 0  # lengths are accepted (unused) for these types
    c.requires_grad_(True)
    out = dpo_loss_from_logprobs(c, r, rc, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    (grad,) = torch.autograd.grad(out.loss, c)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_bad_inputs():
    c, r, rc, rr, lc, lr = make_inputs()
    call = dpo_loss_from_logprobs
    with pytest.raises(ValueError, match="shape"):
        call(c, r[:5], rc, rr)
    with pytest.raises(ValueError, match="shape"):
        call(c, r, rc, rr[:, None])
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        call(c[:, None], r[:, None], rc[:, None], rr[:, None])
    with pytest.raises(ValueError, match="empty batch"):
        call(c[:0], r[:0], rc[:0], rr[:0])
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            call(c, r, rc, rr, beta=beta)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        call(c, r, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="unknown reduction"):
        call(c, r, rc, rr, reduction="batchmean")
    for ls in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            call(c, r, rc, rr, loss_type="robust", label_smoothing=ls)
    with pytest.raises(ValueError, match="gamma"):
        call(c, r, None, None, loss_type="simpo", gamma=float("nan"), chosen_lengths=lc, rejected_lengths=lr)
    with pytest.raises(ValueError, match="floating-point"):
        call(c.long(), r, rc, rr)
    with pytest.raises(ValueError, match="chosen_logps must be a tensor"):
        call(None, r, rc, rr)
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        call(c, r, rc, rr, loss_type="ipo", chosen_lengths=lc[:3], rejected_lengths=lr)
    with pytest.raises(ValueError, match="integer or real"):
        call(c, r, rc, rr, loss_type="ipo", chosen_lengths=lc > 0, rejected_lengths=lr)


def test_dtypes():
    c, r, rc, rr, lc, lr = make_inputs(dtype=torch.bfloat16)
    c.requires_grad_(True)
    out = dpo_loss_from_logprobs(c, r, rc, rr, loss_type="sigmoid_norm", chosen_lengths=lc, rejected_lengths=lr)
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    (grad,) = torch.autograd.grad(out.loss, c)
    assert grad.dtype == torch.bfloat16
    # bf16 inputs are upcast exactly, so the result equals the fp32 computation on the same values
    ref = dpo_loss_from_logprobs(
        *(t.detach().float() for t in (c, r, rc, rr)), loss_type="sigmoid_norm", chosen_lengths=lc, rejected_lengths=lr
    )
    torch.testing.assert_close(out.loss, ref.loss)
    mixed = dpo_loss_from_logprobs(c.detach().float(), r.float(), rc.double(), rr.double())  # fp64 anywhere -> fp64
    assert mixed.loss.dtype == torch.float64


def test_reference_layer_matches_public():
    c, r, rc, rr, lc, lr = make_inputs(seed=8)
    for loss_type in ALL_TYPES:
        losses, cw, rw = dpo_loss_ref(c, r, rc, rr, beta=0.2, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
        out = dpo_loss_from_logprobs(
            c, r, rc, rr, beta=0.2, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, reduction="none"
        )
        torch.testing.assert_close(out.loss, losses)
        torch.testing.assert_close(out.chosen_rewards, cw)
        torch.testing.assert_close(out.rejected_rewards, rw)


def test_module():
    c, r, rc, rr, lc, lr = make_inputs(seed=9)
    mod = DPOLoss(beta=0.2, loss_type="robust", label_smoothing=0.1, reduction="sum")
    assert "robust" in repr(mod) and list(mod.parameters()) == []
    got = mod.forward_from_logprobs(c, r, rc, rr)
    want = dpo_loss_from_logprobs(c, r, rc, rr, beta=0.2, loss_type="robust", label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(got.loss, want.loss)
    simpo = DPOLoss(beta=2.0, loss_type="simpo", gamma=1.0)
    out = simpo.forward_from_logprobs(c, r, chosen_lengths=lc, rejected_lengths=lr)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="reduction"):
        DPOLoss(reduction="avg")
