"""value_loss, gae, whiten and ValueLoss against TRL / verl / OpenRLHF formulas re-derived
here and the textbook GAE recursion; masking, edge cases and bad inputs."""
import math

import pytest
import torch

from fastpo.functional.advantages import gae, value_loss, whiten
from fastpo.modules.policy import ValueLoss
from fastpo.reference.advantages import gae_ref, value_loss_ref, whiten_ref

B, T = 4, 6
LENGTHS = torch.tensor([6, 3, 1, 0])  # full, padded, single token, fully masked


def _data(dtype=torch.float64, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    v_old = v + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = v + torch.randn(B, T, generator=g, dtype=torch.float64)
    rew = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return v.to(dtype).requires_grad_(), v_old.to(dtype), ret.to(dtype), rew.to(dtype), mask


def _verl_value_loss(vpreds, returns, values, mask, c, mode):
    """verl compute_value_loss with agg_loss (token-mean / seq-mean-token-mean, non-empty rows)."""
    clipped = torch.max(torch.min(vpreds, values + c), values - c)  # verl_F.clip_by_value
    losses = torch.max((vpreds - returns) ** 2, (clipped - returns) ** 2)
    m = mask.to(vpreds.dtype)
    if mode == "token-mean":
        return 0.5 * (losses * m).sum() / m.sum()
    return 0.5 * ((losses * m).sum(-1) / m.sum(-1)).mean()


def _openrlhf_value_loss(values, old_values, returns, mask, clip_eps, token_level):
    if clip_eps is not None:
        vc = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.max((vc - returns) ** 2, (values - returns) ** 2)
    else:
        loss = (values - returns) ** 2
    m = mask.to(values.dtype)
    loss = (loss * m).sum() / m.sum() if token_level else ((loss * m).sum(-1) / m.sum(-1)).mean()
    return 0.5 * loss


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip", [0.2, 0.05])  # 0.05: clipping active on most tokens
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_loss_verl(agg, clip, dtype):
    v, v_old, ret, _, mask = _data(dtype, lengths=torch.tensor([6, 3, 1, 2]))
    ours = value_loss(v, v_old, ret, mask, clip=clip, agg=agg)
    v2 = v.detach().double().requires_grad_()
    theirs = _verl_value_loss(v2, ret.double(), v_old.double(), mask, clip, agg)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.double(), theirs.detach(), **tol)
    torch.testing.assert_close(
        torch.autograd.grad(ours, v)[0].double(), torch.autograd.grad(theirs, v2)[0], **tol
    )


@pytest.mark.parametrize("clip", [None, 0.1])  # None: OpenRLHF's unclipped branch
@pytest.mark.parametrize("token_level", [True, False])
def test_value_loss_openrlhf(clip, token_level):
    v, v_old, ret, _, mask = _data(lengths=torch.tensor([6, 3, 1, 2]))
    agg = "token-mean" if token_level else "seq-mean-token-mean"
    ours = value_loss(v, v_old, ret, mask, clip=clip, agg=agg)
    v2 = v.detach().clone().requires_grad_()
    theirs = _openrlhf_value_loss(v2, v_old, ret, mask, clip, token_level)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, v)[0], torch.autograd.grad(theirs, v2)[0])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_value_loss_masked_and_empty_rows(agg):
    # NaN at masked positions (incl. a fully masked row) must not reach the loss or the gradient
    v, v_old, ret, _, mask = _data()
    v = v.detach().clone()
    for x in (v, v_old, ret):
        x[~mask] = math.nan
    v.requires_grad_()
    loss = value_loss(v, v_old, ret, mask.long(), agg=agg, num_sequences=B)
    (g,) = torch.autograd.grad(loss, v)
    assert torch.isfinite(loss) and torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    assert value_loss(v, v_old, ret, torch.zeros_like(mask), agg=agg).item() == 0.0


def test_value_loss_overrides_and_dtypes():
    v, v_old, ret, _, mask = _data()
    base = value_loss(v, v_old, ret, mask)
    torch.testing.assert_close(value_loss(v, v_old, ret, mask, num_tokens=40), base * mask.sum() / 40)
    vb = v.detach().to(torch.bfloat16).requires_grad_()
    out = value_loss(vb, v_old.to(torch.bfloat16), ret.to(torch.bfloat16), mask)
    assert out.dtype == torch.float32 and torch.autograd.grad(out, vb)[0].dtype == torch.bfloat16
    assert value_loss(v, v_old, ret, mask).dtype == torch.float64


def test_value_loss_module():
    v, v_old, ret, _, mask = _data()
    mod = ValueLoss(clip=0.1, agg="seq-mean-token-sum")
    assert torch.equal(mod(v, v_old, ret, mask, num_sequences=3),
                       value_loss(v, v_old, ret, mask, clip=0.1, agg="seq-mean-token-sum", num_sequences=3))
    assert "clip=0.1" in repr(mod)
    with pytest.raises(ValueError, match="agg"):
        ValueLoss(agg="mean")
    with pytest.raises(ValueError, match="clip"):
        ValueLoss(clip=-1.0)


def _gae_textbook(rew, val, lengths, gamma, lam):
    """Right-padded rows: the recursion of Schulman et al. (2016), in Python floats."""
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = int(lengths[i])
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(val[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rew[i, t]) + gamma * next_v - float(val[i, t])
            last = delta + gamma * lam * last
            adv[i][t] = last
    return torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gae_textbook(gamma, lam, dtype):
    _, _, _, rew, mask = _data(dtype)
    val = torch.randn(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    adv, ret = gae(rew, val, mask, gamma=gamma, lam=lam)
    want = _gae_textbook(rew.double(), val.double(), LENGTHS, gamma, lam)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv.double(), want, **tol)
    torch.testing.assert_close(ret.double(), torch.where(mask, want + val.double(), 0.0), **tol)
    assert not adv.requires_grad and adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_gae_masked_middle_tokens_like_verl():
    """verl compute_gae_advantage_return (before its whitening): masked tokens are skipped."""
    _, _, _, rew, _ = _data()
    val = torch.randn(B, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    gamma, lam = 0.97, 0.9
    m = mask.double()
    nextvalues, lastgaelam, rev = 0.0, 0.0, []
    for t in reversed(range(T)):
        delta = rew[:, t] + gamma * nextvalues - val[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = val[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        rev.append(lastgaelam)
    want = torch.stack(rev[::-1], dim=1)
    adv, ret = gae(rew, val, mask, gamma=gamma, lam=lam)
    keep = mask.bool()
    torch.testing.assert_close(adv[keep], want[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret[keep], (want + val)[keep], rtol=1e-12, atol=1e-12)
    assert not adv[~keep].any() and not ret[~keep].any()


def _trl_masked_whiten(x, m, shift_mean=True):
    """TRL / verl masked_whiten: unbiased (Bessel) masked variance, rsqrt(var + 1e-8)."""
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) ** 2) * m).sum() / m.sum()
    var = var * m.sum() / (m.sum() - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whiten(shift_mean, dtype):
    _, _, _, rew, mask = _data(dtype)
    x = (rew * 3 + 1).detach().requires_grad_()
    out = whiten(x, mask, shift_mean)
    x2 = x.detach().double().requires_grad_()
    want = _trl_masked_whiten(x2, mask.double(), shift_mean)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double()[mask], want[mask].detach(), **tol)
    assert not out[~mask].any()
    up = torch.randn(B, T, dtype=torch.float64) * mask  # gradients through the counted outputs
    torch.testing.assert_close(
        torch.autograd.grad(out, x, up.to(out.dtype))[0].double(), torch.autograd.grad(want, x2, up)[0], **tol
    )


@pytest.mark.parametrize("n", [0, 1])  # TRL raises (or divides by zero) here; fastpo returns zeros
def test_whiten_degenerate(n):
    x = torch.randn(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask.view(-1)[:n] = True
    out = whiten(x, mask)
    assert torch.isfinite(out).all() and not out.any()


def test_public_equals_reference():
    v, v_old, ret, rew, mask = _data(torch.float32)
    assert torch.equal(value_loss(v, v_old, ret, mask), value_loss_ref(v, v_old, ret, mask))
    assert all(torch.equal(a, b) for a, b in zip(gae(rew, v, mask), gae_ref(rew, v, mask)))
    assert torch.equal(whiten(rew, mask), whiten_ref(rew, mask))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda v, o, r, w, m: value_loss(v[0], o[0], r[0], m[0]), r"shape \[B, T\]"),
        (lambda v, o, r, w, m: value_loss(v, o[:, :-1], r, m), "old_values must have shape"),
        (lambda v, o, r, w, m: value_loss(v, o, r, m[:-1]), "mask must have shape"),
        (lambda v, o, r, w, m: value_loss(v, o, r.long(), m), "floating-point"),
        (lambda v, o, r, w, m: value_loss(v, o, r, m, clip=-0.1), "clip"),
        (lambda v, o, r, w, m: value_loss(v, o, r, m, agg="mean"), "unknown agg"),
        (lambda v, o, r, w, m: value_loss(v, o, r, m, agg_scale=0), "agg_scale"),
        (lambda v, o, r, w, m: value_loss(v, o, r, m, num_tokens=0), "num_tokens"),
        (lambda v, o, r, w, m: gae(w, v, m, gamma=1.5), "gamma"),
        (lambda v, o, r, w, m: gae(w, v, m, lam=-0.1), "lam"),
        (lambda v, o, r, w, m: gae(w, v[:, :2], m), "values must have shape"),
        (lambda v, o, r, w, m: gae(w.long(), v, m), "floating-point"),
        (lambda v, o, r, w, m: whiten(w, m[:, :2]), "shape"),
        (lambda v, o, r, w, m: whiten(w.long(), m), "floating-point"),
        (lambda v, o, r, w, m: whiten(w, m, eps=-1.0), "eps"),
    ],
)
def test_bad_inputs(call, match):
    v, v_old, ret, rew, mask = _data()
    with pytest.raises(ValueError, match=match):
        call(v, v_old, ret, rew, mask)
