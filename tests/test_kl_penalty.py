"""kl_penalty: every estimator against its textbook formula and hand-derived gradient,
clamping, the straight-through "+" forms, verl/OpenRLHF parity and bad inputs."""
import math

import pytest
import torch

from fastpo.functional.kl_penalty import kl_penalty
from fastpo.reference.kl_penalty import kl_penalty_ref

BASE = ("k1", "k2", "k3", "abs")


def _oracle(d: torch.Tensor, base: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d value / d logp) written straight from Schulman's blog, d = logp - ref."""
    if base == "k1":
        return d, torch.ones_like(d)
    if base == "k2":
        return 0.5 * d * d, d
    if base == "k3":
        return torch.exp(-d) + d - 1.0, 1.0 - torch.exp(-d)
    return d.abs(), torch.sign(d)


def _inputs(dtype, shape=(3, 7), spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 - 2.0).to(dtype)
    ref = (lp.double() + spread * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    return lp.requires_grad_(), ref.requires_grad_(), up


def _value_and_grads(lp, ref, up, estimator, clamp=None):
    out = kl_penalty(lp, ref, estimator, clamp)
    g_lp, g_ref = torch.autograd.grad(out, (lp, ref), up.to(out.dtype))
    return out, g_lp, g_ref


@pytest.mark.parametrize("estimator", BASE + tuple(b + "+" for b in BASE))
# float64: exact formula check; float32: the fp32 path against the float64 oracle (DESIGN tolerance)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_estimator_value_and_gradient(estimator, dtype):
    lp, ref, up = _inputs(dtype)
    out, g_lp, g_ref = _value_and_grads(lp, ref, up, estimator)
    d = lp.detach().double() - ref.detach().double()
    base = estimator.rstrip("+")
    value, slope = _oracle(d, base)
    if estimator.endswith("+"):
        slope = d  # straight-through: the gradient of k2
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), value, **tol)
    torch.testing.assert_close(g_lp.double(), up * slope, **tol)
    torch.testing.assert_close(g_ref.double(), -up * slope, **tol)


@pytest.mark.parametrize("estimator", BASE + ("k1+", "k3+"))
# clamp small enough to be active on part of the data: value saturates, gradient 0 there ("+": k2 gradient)
def test_clamp(estimator):
    lp, ref, up = _inputs(torch.float64, spread=3.0, seed=1)
    c = 1.5
    out, g_lp, _ = _value_and_grads(lp, ref, up, estimator, clamp=c)
    d = lp.detach() - ref.detach()
    value, slope = _oracle(d, estimator.rstrip("+"))
    inside = (value > -c) & (value < c)
    assert (~inside).any() and inside.any()
    torch.testing.assert_close(out, value.clamp(-c, c), rtol=1e-12, atol=1e-12)
    expected = d if estimator.endswith("+") else torch.where(inside, slope, torch.zeros_like(slope))
    torch.testing.assert_close(g_lp, up * expected, rtol=1e-12, atol=1e-12)


def _verl_kl(lp, ref, kl_type):
    """verl core_algos.kl_penalty (+ straight-through), re-derived from its source."""
    base = kl_type.rstrip("+")
    if base in ("kl", "k1"):
        fwd = lp - ref
    elif base == "abs":
        fwd = (lp - ref).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (lp - ref).square()
    else:  # low_var_kl / k3
        kl = torch.clamp(ref - lp, min=-20, max=20)
        fwd = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kl_type.endswith("+"):
        return fwd
    back = 0.5 * (lp - ref).square()
    return back - back.detach() + fwd.detach()


@pytest.mark.parametrize(
    "verl_type,estimator,clamp",
    [
        ("low_var_kl", "k3", 10.0),
        ("k3+", "k3+", 10.0),
        ("kl", "k1", None),
        ("mse", "k2", None),
        ("abs", "abs", None),
        ("k1+", "k1+", None),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verl_parity(verl_type, estimator, clamp, dtype):
    # log-ratios from -40 to 40: both of verl's clamps (exponent at 20, value at 10) are exercised
    d = torch.tensor([-40.0, -25.0, -12.0, -11.5, -3.0, -0.4, 0.0, 0.3, 2.0, 3.2, 3.5, 21.0, 40.0], dtype=dtype)
    lp = (torch.full_like(d, -5.0)).requires_grad_()
    ref = (lp.detach() - d).requires_grad_()
    up = torch.linspace(-1.0, 1.0, d.numel(), dtype=torch.float64)
    out, g_lp, g_ref = _value_and_grads(lp, ref, up, estimator, clamp)
    lp64 = lp.detach().double().requires_grad_()
    ref64 = ref.detach().double().requires_grad_()
    want = _verl_kl(lp64, ref64, verl_type)
    w_lp, w_ref = torch.autograd.grad(want, (lp64, ref64), up)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    torch.testing.assert_close(g_lp.double(), w_lp, **tol)
    torch.testing.assert_close(g_ref.double(), w_ref, **tol)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_parity(estimator):
    """OpenRLHF compute_approx_kl: estimator value clamped to [-10, 10] (recent releases)."""
    lp, ref, up = _inputs(torch.float64, spread=6.0, seed=2)
    lr = lp - ref
    if estimator == "k1":
        want = lr
    elif estimator == "k2":
        want = lr**2 / 2.0
    else:
        want = (-lr).exp() - 1 - (-lr)
    want = want.clamp(min=-10, max=10)
    w_lp, w_ref = torch.autograd.grad(want, (lp, ref), up)
    out, g_lp, g_ref = _value_and_grads(lp, ref, up, estimator, clamp=10.0)
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_lp, w_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ref, w_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", BASE + ("k3+", "abs+"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_log_ratios_finite_with_clamp(estimator, dtype):
    # |d| up to 1e4: exp(1e4) overflows every float format; with a clamp nothing may be inf/NaN
    d = torch.tensor([-1e4, -300.0, -90.0, -20.0, 0.0, 20.0, 90.0, 300.0, 1e4])
    lp = torch.zeros_like(d).to(dtype).requires_grad_()
    ref = (-d).to(dtype).requires_grad_()
    out = kl_penalty(lp, ref, estimator, clamp=10.0)
    g_lp, g_ref = torch.autograd.grad(out.sum(), (lp, ref))
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 10.0
    if not estimator.endswith("+"):  # "+" gradients are k2's (unclamped) by definition
        assert torch.isfinite(g_lp).all() and torch.isfinite(g_ref).all()


@pytest.mark.parametrize(
    "dtype,acc", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]
)
def test_dtypes(dtype, acc):
    lp, ref, _ = _inputs(dtype)
    out = kl_penalty(lp, ref)
    assert out.dtype == acc
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert g.dtype == dtype


def test_public_matches_reference_and_default_is_k3():
    lp, ref, _ = _inputs(torch.float32)
    torch.testing.assert_close(kl_penalty(lp, ref), kl_penalty_ref(lp, ref, "k3"), rtol=0, atol=0)
    d = (lp - ref).detach().double()
    torch.testing.assert_close(kl_penalty(lp, ref).double(), torch.exp(-d) + d - 1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(estimator="k4"), ValueError, "unknown KL estimator"),
        (dict(estimator="low_var_kl"), ValueError, "unknown KL estimator"),  # verl names go through presets.verl
        (dict(estimator="k3++"), ValueError, "unknown KL estimator"),
        (dict(clamp=0.0), ValueError, "clamp"),
        (dict(clamp=-1.0), ValueError, "clamp"),
        (dict(clamp=math.nan), ValueError, "clamp"),
        (dict(clamp="big"), ValueError, "clamp"),
    ],
)
def test_bad_options(kwargs, exc, match):
    lp, ref, _ = _inputs(torch.float32)
    with pytest.raises(exc, match=match):
        kl_penalty(lp, ref, **kwargs)


def test_bad_tensors():
    lp, ref, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(lp, ref[:, :-1])
    with pytest.raises(ValueError, match="floating-point"):
        kl_penalty(lp, ref.long())
    with pytest.raises(TypeError):
        kl_penalty(lp, [0.0] * 7)
