"""The Triton launchers of fastpo/kernels called directly (3-D row contract), under the
interpreter on CPU: non-finite logits, bad labels, strided rows read in place, temperature,
FP fusion and batch invariance (issue 8, defects 1-5, 8, 10, 11; the compile-only checks
are in tests/test_aot_triton.py)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton")
from fastpo._env import triton_interpreting  # noqa: E402

if not torch.cuda.is_available() and not triton_interpreting():
    pytest.skip("triton kernels need a GPU or the interpreter", allow_module_level=True)

from fastpo.config import PolicyLossConfig  # noqa: E402
from fastpo.kernels import policy_loss as pl  # noqa: E402
from fastpo.kernels import token_logprobs as tk  # noqa: E402
from fastpo.kernels.policy_args import PolicyKernelArgs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
NAN_COLS = [0, 1, 7, 1023, 1024, 4095]  # first lane, inside a vector, block edges, last full-block column


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _labels(n, v, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, (n,), generator=g).to(DEV)


def _ref(x, y, tau=1.0, g_lp=None, g_h=None):
    """float64 logp, entropy and dL/dx of L = sum g_lp logp + g_h H, with 0 log 0 = 0."""
    z = x.detach().double().reshape(-1, x.shape[-1]) / tau
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    plogp = torch.where(p > 0, p * logp_all, torch.zeros_like(p))
    ent = -plogp.sum(-1)
    keep = y != IGNORE
    yc = y.clamp(0, x.shape[-1] - 1)
    logp = torch.where(keep, logp_all.gather(-1, yc[:, None])[:, 0], torch.zeros_like(ent))
    ent = torch.where(keep, ent, torch.zeros_like(ent))
    if g_lp is None:
        return logp, ent
    onehot = torch.nn.functional.one_hot(yc, x.shape[-1]).double()
    grad = g_lp.double()[:, None] * (onehot - p)
    grad = grad - g_h.double()[:, None] * (plogp + p * ent[:, None])
    grad = torch.where(keep[:, None], grad / tau, torch.zeros_like(grad))
    return logp, ent, grad


def _abs_rel(a, e):
    """max |a - e| / max(1, max |e|)."""
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    return float((a - e).abs().max() / max(1.0, float(e.abs().max())))


def _fwd_bwd(x, y, tau=1.0, g_lp=None, g_h=None, grad_out=None):
    logp, ent, lse = tk.token_logprobs_fwd(x, y, tau, IGNORE)
    n = logp.numel()
    g_lp = torch.ones(n, dtype=logp.dtype, device=DEV) if g_lp is None else g_lp.to(logp.dtype)
    g_h = torch.ones(n, dtype=logp.dtype, device=DEV) if g_h is None else g_h.to(logp.dtype)
    out = torch.empty(x.shape, dtype=x.dtype, device=DEV) if grad_out is None else grad_out
    grad = tk.token_logprobs_bwd(x, y, lse, ent, g_lp, g_h, tau, IGNORE, out)
    return logp, ent, grad


def _policy(x, y, *, grad_out="new", config=None, seed=3):
    n = y.numel()
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    old = (-5 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(acc).to(DEV)
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(acc).to(DEV)
    w = torch.full((n,), 1.0 / n, dtype=acc, device=DEV)
    args = PolicyKernelArgs.from_config(config or PolicyLossConfig(entropy_coef=0.05), has_ref=False,
                                        ignore_index=IGNORE)
    out = torch.empty(x.shape, dtype=x.dtype, device=DEV) if isinstance(grad_out, str) else grad_out
    loss, logp, ent = pl.policy_loss_fwd(x, y, old, adv, None, w, args, out)
    return loss, logp, ent, out


class _Spy:
    """Records the arguments and launch options of a kernel's launches (and still runs it)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __enter__(self):
        real = self.kernel.run

        def run(*args, **kwargs):
            self.calls.append((args, kwargs))
            return real(*args, **kwargs)

        self.kernel.run = run
        return self

    def __exit__(self, *exc):
        del self.kernel.run


# ----------------------------------------------------------------------------- defect 2: NaN
@pytest.mark.parametrize("col", NAN_COLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_anywhere_gives_nan_row_only(col, dtype):
    v = 4099  # two 4096-wide blocks, ragged tail: the NaN lands in the first block or at its edge
    x = _logits((3, v), dtype)
    x[1, col] = float("nan")
    y = _labels(3, v)
    logp, ent, grad = _fwd_bwd(x, y)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1]) and torch.isnan(grad[1].float()).all()
    keep = torch.tensor([0, 2])
    lr, er, gr = _ref(x[keep], y[keep], g_lp=torch.ones(2), g_h=torch.ones(2))
    assert rel_err(logp[keep], lr) <= 1e-5 and rel_err(ent[keep], er) <= 1e-5
    assert torch.isfinite(grad[keep].float()).all()
    loss, p_logp, p_ent, p_grad = _policy(x, y)
    assert torch.isnan(loss[1]) and torch.isnan(p_logp[1]) and torch.isnan(p_ent[1])
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(p_grad[keep].float()).all()


def test_nan_in_tail_and_small_vocab():
    for v, col in [(17, 16), (1000, 999), (4099, 4098)]:
        x = _logits((2, v), torch.float32)
        x[0, col] = float("nan")
        logp, ent, _ = tk.token_logprobs_fwd(x, _labels(2, v), 1.0, IGNORE)
        assert torch.isnan(logp[0]) and torch.isnan(ent[0]) and torch.isfinite(logp[1])


# ----------------------------------------------------------------------------- defect 3: -inf
def _masked_vocab(v, dtype, mode):
    x = _logits((4, v), dtype)
    g = torch.Generator().manual_seed(5)
    if mode == "half":
        drop = torch.rand(4, v, generator=g) < 0.5
    elif mode == "leading-half":  # the first block(s) entirely -inf: the shift must stay finite
        drop = torch.zeros(4, v, dtype=torch.bool)
        drop[:, : v // 2 + 1] = True
    else:  # all but one
        drop = torch.ones(4, v, dtype=torch.bool)
        drop[torch.arange(4), torch.randint(0, v, (4,), generator=g)] = False
    x = x.masked_fill(drop.to(DEV), float("-inf"))
    alive = (~drop).to(DEV)
    y = torch.stack([torch.nonzero(alive[i])[0, 0] for i in range(4)])  # a label with finite logit
    return x, y, drop.to(DEV)


@pytest.mark.parametrize("mode", ["half", "leading-half", "all-but-one"])
@pytest.mark.parametrize("v", [17, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_neg_inf_logits_exact(mode, v, dtype):
    x, y, drop = _masked_vocab(v, dtype, mode)
    g_lp = torch.randn(4, dtype=torch.float64)
    g_h = torch.randn(4, dtype=torch.float64)
    logp, ent, grad = _fwd_bwd(x, y, 0.7, g_lp.to(DEV), g_h.to(DEV))
    lr, er, gr = _ref(x, y, 0.7, g_lp, g_h)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad.float()).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # all-but-one rows have logp = H = 0: compare absolutely there (k*x - m is one fp32 rounding)
    assert _abs_rel(logp, lr) <= tol and _abs_rel(ent, er) <= tol
    assert _abs_rel(grad, gr) <= (1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2)
    assert (grad[drop] == 0).all()  # exactly zero where the logit is -inf
    loss, p_logp, p_ent, p_grad = _policy(x, y)
    assert torch.isfinite(loss).all() and torch.isfinite(p_grad.float()).all()
    assert (p_grad[drop] == 0).all()
    assert _abs_rel(p_logp, _ref(x, y)[0]) <= tol


# ----------------------------------------------------------------------------- defect 4: bad labels
@pytest.mark.parametrize("bad", [4099, 10**6, -5])
def test_label_out_of_range_gives_nan_without_reading(bad):
    x = _logits((3, 4099), torch.float32)
    y = _labels(3, 4099)
    y[1] = bad
    y[2] = IGNORE
    logp, ent, grad = _fwd_bwd(x, y)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1]) and torch.isnan(grad[1]).all()
    assert logp[2] == 0 and ent[2] == 0 and (grad[2] == 0).all()
    assert torch.isfinite(logp[0]) and torch.isfinite(grad[0]).all()
    loss, p_logp, p_ent, p_grad = _policy(x, y)
    assert torch.isnan(loss[1]) and torch.isnan(p_logp[1]) and torch.isnan(p_ent[1]) and torch.isnan(p_grad[1]).all()
    assert loss[2] == 0 and (p_grad[2] == 0).all() and torch.isfinite(loss[0])


# ----------------------------------------------------------------------------- defect 5: strided rows
@pytest.mark.parametrize("v", [17, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shifted_3d_view_read_in_place(v, dtype):
    full = _logits((2, 4, v), dtype)
    x = full[:, :-1]  # [B, T-1, V] causal shift: strides (4V, V), not contiguous
    y = _labels(6, v)
    y[4] = IGNORE
    with _Spy(tk._token_logprobs_fwd_kernel) as fwd, _Spy(tk._token_logprobs_bwd_kernel) as bwd:
        logp, ent, grad = _fwd_bwd(x, y)
    assert fwd.calls[0][0][0].data_ptr() == x.data_ptr() and bwd.calls[0][0][0].data_ptr() == x.data_ptr()
    assert fwd.calls[0][0][0].shape == x.shape  # the view itself, no reshape copy
    lc, ec, gc = _fwd_bwd(x.contiguous().view(6, v), y)
    assert torch.equal(logp, lc) and torch.equal(ent, ec) and torch.equal(grad.view(6, v), gc)
    lr, er, gr = _ref(x, y, g_lp=torch.ones(6), g_h=torch.ones(6))
    assert rel_err(logp, lr) <= 1e-5 and rel_err(ent, er) <= 1e-5
    # in place: the gradient overwrites the view's rows, the last position is untouched
    keep_last = full[:, -1].clone()
    g_inplace = tk.token_logprobs_bwd(x, y, *tk.token_logprobs_fwd(x, y, 1.0, IGNORE)[2:0:-1],
                                      torch.ones(6), torch.ones(6), 1.0, IGNORE, x)
    assert g_inplace.data_ptr() == x.data_ptr()
    assert torch.equal(full[:, :-1].reshape(6, v), gc) and torch.equal(full[:, -1], keep_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_shifted_view_and_inplace(dtype):
    v = 1000
    full = _logits((2, 4, v), dtype)
    x = full[:, :-1]
    y = _labels(6, v)
    y[2] = IGNORE
    ref_loss, ref_logp, ref_ent, ref_grad = _policy(x.contiguous(), y)
    with _Spy(pl._policy_loss_fwd_kernel) as spy:
        loss, logp, ent, grad = _policy(x, y)
    assert spy.calls[0][0][0].data_ptr() == x.data_ptr()
    assert torch.equal(loss, ref_loss) and torch.equal(logp, ref_logp) and torch.equal(grad, ref_grad)
    keep_last = full[:, -1].clone()
    loss_i, logp_i, _, g = _policy(x, y, grad_out=x)  # gradient written over the logits
    assert g.data_ptr() == x.data_ptr() and torch.equal(loss_i, ref_loss) and torch.equal(logp_i, ref_logp)
    assert torch.equal(full[:, :-1], ref_grad) and torch.equal(full[:, -1], keep_last)


def test_2d_row_stride_and_separate_grad_strides():
    v = 1000
    wide = _logits((5, v + 3), torch.float32)
    x = wide[:, 1:v + 1]  # row stride V + 3, misaligned base
    y = _labels(5, v)
    grad_buf = torch.zeros(5, 2 * v)
    logp, ent, grad = _fwd_bwd(x, y, grad_out=grad_buf[:, :v])
    lc, ec, gc = _fwd_bwd(x.contiguous(), y)
    assert torch.equal(logp, lc) and torch.equal(grad, gc) and (grad_buf[:, v:] == 0).all()


# ----------------------------------------------------------------------------- defect 8: temperature
def test_temperature_scale_is_float64_on_host():
    """1/tau enters as an fp64 argument computed on the host: float64 logits at tau = 0.7
    match float64 torch to ~1e-15 (an fp32 1/tau would be off by ~1e-8)."""
    x = _logits((3, 1000), torch.float64)
    y = _labels(3, 1000)
    g = torch.randn(3, dtype=torch.float64)
    logp, ent, grad = _fwd_bwd(x, y, 0.7, g, g)
    lr, er, gr = _ref(x, y, 0.7, g, g)
    assert rel_err(logp, lr) <= 1e-13 and rel_err(ent, er) <= 1e-13 and rel_err(grad, gr) <= 1e-13
    x32 = x.float()
    l32, e32, g32 = _fwd_bwd(x32, y, 0.7, g, g)
    assert rel_err(l32, lr) <= 1e-5 and rel_err(e32, er) <= 1e-5 and rel_err(g32, gr) <= 1e-5


def test_fp_fusion_set_explicitly_on_every_launch():
    x = _logits((2, 64), torch.float32)
    y = _labels(2, 64)
    with _Spy(tk._token_logprobs_fwd_kernel) as f, _Spy(tk._token_logprobs_bwd_kernel) as b, \
            _Spy(pl._policy_loss_fwd_kernel) as p:
        _fwd_bwd(x, y)
        _policy(x, y)
    for spy in (f, b, p):
        assert spy.calls and spy.calls[0][1].get("enable_fp_fusion") is False
        assert "temperature" not in spy.calls[0][1]
    import inspect

    for kernel in (tk._token_logprobs_fwd_kernel, tk._token_logprobs_bwd_kernel, pl._policy_loss_fwd_kernel):
        params = inspect.signature(kernel.fn).parameters
        assert "k" in params and "temperature" not in params
        assert "float64" in str(params["k"].annotation)


# ----------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_alone_equals_row_in_batch_bitwise(dtype):
    v = 4099
    x = _logits((5, v), dtype)
    y = _labels(5, v)
    logp, ent, grad = _fwd_bwd(x, y, 0.7)
    loss, p_logp, _, p_grad = _policy(x, y)
    for i in (0, 3):
        for alone in (x[i:i + 1], x[i:i + 1].clone(), x[i].view(1, 1, v)):
            li, ei, gi = _fwd_bwd(alone, y[i:i + 1], 0.7)
            assert torch.equal(li, logp[i:i + 1]) and torch.equal(ei, ent[i:i + 1])
            assert torch.equal(gi.reshape(1, v), grad[i:i + 1])
    # the policy kernel: a row's loss/logp/grad does not depend on the other rows (weights aside)
    loss2, p_logp2, _, p_grad2 = _policy(torch.cat([x[:2], _logits((3, v), dtype, seed=9)]), y)
    assert torch.equal(p_logp2[:2], p_logp[:2]) and torch.equal(loss2[:2], loss[:2])
    assert torch.equal(p_grad2[:2], p_grad[:2])


def test_odd_vocab_all_dtypes_match_float64():
    for v in (17, 1000, 4099):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = _logits((3, v), dtype)
            y = _labels(3, v)
            logp, ent, grad = _fwd_bwd(x, y, 0.7)
            lr, er, gr = _ref(x, y, 0.7, torch.ones(3), torch.ones(3))
            assert rel_err(logp, lr) <= 1e-5 and rel_err(ent, er) <= 1e-5, (v, dtype)
            assert rel_err(grad, gr) <= (1e-5 if dtype == torch.float32 else 1.5e-2), (v, dtype)
            assert math.isfinite(float(grad.float().abs().max()))
