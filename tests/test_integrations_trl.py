"""fastpo.integrations.trl against TRL 1.16's own code: the fused LM head
(``ChunkedLogProbFunction``), the logits-level helpers, the switch and its restoration."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
import trl.trainer.utils as trl_utils  # noqa: E402
from trl.kernels import chunked_logprob as trl_kernel  # noqa: E402

import fastpo.integrations.trl as ft  # noqa: E402
from fastpo.integrations import trl_head, trl_logits  # noqa: E402

TRL_HEAD = trl_kernel.ChunkedLogProbFunction
ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
NAMES = ("log_probs",) + ALL_OUTPUTS


@pytest.fixture(autouse=True)
def _switched_off():
    ft.disable()
    yield
    ft.disable()


def _head_inputs(n, h, v, dtype, *, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():  # make a few targets the argmax so is_top1 is not all False
        targets[::3] = (hidden[::3].double() @ weight.double().T).argmax(-1)
    return hidden, weight, b, targets


def _run_head(fn, hidden, weight, bias, targets, temperature, softcap, scale, outputs):
    out = fn.apply(hidden, weight, bias, targets, temperature, 32768, softcap, scale, outputs)
    n = hidden.shape[0]
    loss = (out[0] * torch.linspace(-1, 1, n)).sum()
    if out[1] is not None:  # an entropy term with its own weights, so both gradient paths count
        loss = loss + (out[1] * torch.linspace(0.5, 2, n)).sum()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    return out, torch.autograd.grad(loss, leaves)


def _ref_head(hidden, weight, bias, targets, temperature, softcap, scale):
    """TRL's transform on fp64 materialised logits: x = s * tanh(z * L / s) / T."""
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


# (temperature, softcap, logit_scale, bias): why each is there
OPTIONS = [
    pytest.param(1.0, None, 1.0, False, id="plain"),
    pytest.param(0.7, None, 1.0, False, id="temperature"),
    pytest.param(1.0, None, 0.25, True, id="logit_scale+bias"),  # Granite-style 1/logits_scaling
    pytest.param(1.3, 2.0, 1.7, True, id="softcap+scale+temp+bias"),  # softcap saturates: tanh chain rule
]
OUTPUT_SETS = [pytest.param((), id="logp-only"), pytest.param(ALL_OUTPUTS, id="all-outputs"),
               pytest.param(("is_top1", "entropy"), id="entropy+top1")]


# the served head keeps a call's logits for the backward when they fit in trl_head.KEEP_LOGITS_BYTES
KEEP = [pytest.param(1 << 30, id="logits-kept"), pytest.param(0, id="logits-recomputed")]


@pytest.fixture(params=KEEP)
def keep_budget(request, monkeypatch):
    monkeypatch.setattr(trl_head, "KEEP_LOGITS_BYTES", request.param)


@pytest.mark.parametrize("outputs", OUTPUT_SETS)
@pytest.mark.parametrize("temperature,softcap,scale,bias", OPTIONS)
def test_head_matches_trl_fp32(temperature, softcap, scale, bias, outputs, keep_budget):
    # N = 67, V = 157: odd sizes, several fastpo row chunks not forced
    args = _head_inputs(67, 24, 157, torch.float32, bias=bias)
    (want, want_g), (got, got_g) = (_run_head(f, *args, temperature, softcap, scale, outputs)
                                    for f in (TRL_HEAD, ft.FastpoChunkedLogProb))
    for name, w, g in zip(NAMES, want, got):
        assert (w is None) == (g is None), name
        if w is None:
            continue
        assert g.dtype == w.dtype and g.shape == w.shape and g.requires_grad == w.requires_grad, name
        if name == "is_top1":
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=name)
    for w, g in zip(want_g, got_g):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("temperature,softcap,scale,bias", OPTIONS)
def test_head_bf16_error_no_larger_than_trls(temperature, softcap, scale, bias, keep_budget):
    """bf16: both differ from fp64 math; fastpo's error must not exceed TRL's own (by > 1.5x)."""
    args = _head_inputs(64, 32, 301, torch.bfloat16, bias=bias, seed=3)
    ref_lp, ref_ent = _ref_head(*[a.detach() if a is not None else None for a in args], temperature, softcap, scale)
    (want, want_g), (got, got_g) = (_run_head(f, *args, temperature, softcap, scale, ("entropy",))
                                    for f in (TRL_HEAD, ft.FastpoChunkedLogProb))
    for i, ref in ((0, ref_lp), (1, ref_ent)):
        assert got[i].dtype == torch.float32
        err_trl = (want[i].double() - ref).abs().max().item()
        err_fastpo = (got[i].double() - ref).abs().max().item()
        assert err_fastpo <= 1.5 * err_trl + 1e-3, (i, err_fastpo, err_trl)
    for w, g in zip(want_g, got_g):
        assert g.dtype == w.dtype == torch.bfloat16
        scale_g = w.double().abs().max().item()
        assert (g.double() - w.double()).abs().max().item() <= 3e-2 * scale_g


def test_head_autocast_dtype_rule():
    """Under CPU autocast (bf16) the head computes in bf16 from fp32 parameters, as TRL does;
    gradients come back in the parameters' dtype (fp32)."""
    args = _head_inputs(40, 32, 129, torch.float32, bias=True, seed=5)
    results = []
    for f in (TRL_HEAD, ft.FastpoChunkedLogProb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run_head(f, *args, 1.0, None, 1.0, ("entropy",)))
    plain = _run_head(ft.FastpoChunkedLogProb, *args, 1.0, None, 1.0, ("entropy",))
    (want, want_g), (got, got_g) = results
    ref = _ref_head(*[a.detach() for a in args], 1.0, None, 1.0)
    for w, g, r in zip(want[:2], got[:2], ref):
        assert g.dtype == torch.float32
        assert (g.double() - r).abs().max() <= 1.5 * (w.double() - r).abs().max() + 1e-3
    # bf16 compute is visible: autocast changes the numbers relative to fp32 compute
    assert (got[0] - plain[0][0]).abs().max() > 1e-5
    for w, g in zip(want_g, got_g):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=5e-2 * w.abs().max().item())


def test_head_empty_and_fallback():
    # all-masked micro-batch under compact scoring: N = 0 rows still gives a differentiable zero
    hidden, weight, bias, _ = _head_inputs(4, 8, 13, torch.float32, bias=True)
    out = ft.FastpoChunkedLogProb.apply(hidden[:0], weight, bias, torch.zeros(0, dtype=torch.long), 1.0, 32768,
                                        None, 1.0, ALL_OUTPUTS)
    assert out[0].shape == (0,) and out[4].dtype == torch.bool
    out[0].sum().backward()
    assert weight.grad is not None and not weight.grad.any()
    # logit_scale <= 0 is not expressible in fastpo: TRL's own function, with a one-time warning
    trl_head._warned.clear()
    args = _head_inputs(6, 8, 13, torch.float32, bias=False)
    with pytest.warns(UserWarning, match="using TRL's ChunkedLogProbFunction"):
        got = ft.FastpoChunkedLogProb.apply(*args, 1.0, 32768, 3.0, -0.5, ("entropy",))
    want = TRL_HEAD.apply(*args, 1.0, 32768, 3.0, -0.5, ("entropy",))
    assert torch.equal(got[0], want[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.FastpoChunkedLogProb.apply(*args, 1.0, 32768, 3.0, -0.5, ("entropy",))


@pytest.mark.parametrize("keep,gemms", [(16 * 33 * 4, 3), (16 * 33 * 4 - 1, 4)])  # fits exactly / 1 byte short
def test_head_kept_logits_skip_the_recompute_gemm(monkeypatch, keep, gemms):
    """Kept logits: forward 1 vocabulary GEMM, backward 2 (dL/dhidden, dL/dweight); recomputed: 1 + 3."""
    monkeypatch.setattr(trl_head, "KEEP_LOGITS_BYTES", keep)
    hidden, weight, _, targets = _head_inputs(16, 8, 33, torch.float32, bias=False)
    with torch.profiler.profile(record_shapes=True) as prof:
        out = ft.FastpoChunkedLogProb.apply(hidden, weight, None, targets, 0.8, 32768, None, 1.0, ("entropy",))
        (out[0].sum() + out[1].sum()).backward()
    vocab_gemms = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")
                   and any(33 in shape for shape in e.input_shapes if shape)]
    assert len(vocab_gemms) == gemms, [(e.name, e.input_shapes) for e in vocab_gemms]


def test_profiler_sees_fastpo_and_not_trls_tiles(monkeypatch):
    calls = []
    for name in ("_forward_tile", "_backward_tile"):
        orig = getattr(trl_kernel, name)
        monkeypatch.setattr(trl_kernel, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    args = _head_inputs(16, 8, 33, torch.float32, bias=False)
    with ft.patched(), torch.profiler.profile() as prof:
        out = trl_utils._ChunkedLogProbFunction.apply(*args, 1.0, 32768, None, 1.0, ("entropy",))
        (out[0].sum() + out[1].sum()).backward()
    keys = {e.key for e in prof.key_averages()}
    assert any(k.startswith("fastpo::token_logprobs_fwd") for k in keys), sorted(keys)[:40]
    assert any(k.startswith("fastpo::token_logprobs_bwd") for k in keys), sorted(keys)[:40]
    assert calls == []
    # and the unpatched name really is TRL's (the spy works)
    out = trl_utils._ChunkedLogProbFunction.apply(*args, 1.0, 32768, None, 1.0, ())
    out[0].sum().backward()
    assert calls == ["_forward_tile", "_backward_tile"]


# ----------------------------------------------------------------------------- logits helpers
def _trl(name):
    return ft.original(name)


# TRL's TestSelectiveLogSoftmax (tests/test_utils.py, trl 1.16): B = 4, T = 32, V = 1024, four dtypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_trl_selective_log_softmax_cases(dtype):
    torch.manual_seed(0)
    input_ids = torch.randint(low=0, high=1024, size=(4, 32))
    logits = torch.randn(4, 32, 1024, dtype=dtype)
    expected = torch.gather(logits.log_softmax(-1), dim=-1, index=input_ids.unsqueeze(-1)).squeeze(-1)
    actual = ft.selective_log_softmax(logits, input_ids)
    assert actual.dtype == dtype and actual.shape == (4, 32)
    if dtype in (torch.float16, torch.bfloat16):
        # TRL asserts torch.equal for its row-wise log_softmax; fastpo rounds its fp32 result once
        # to the same dtype, so it may differ by one ulp of the half type
        ulp = torch.finfo(dtype).eps * expected.float().abs().max().item()
        assert (actual.float() - expected.float()).abs().max().item() <= ulp
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8])
def test_trl_selective_log_softmax_multi_index_falls_back(dtype, k):
    """An index [..., K] is TRL's own code (exactly), with a one-time warning."""
    torch.manual_seed(0)
    index = torch.randint(low=0, high=1024, size=(4, 32, k))
    logits = torch.randn(4, 32, 1024, dtype=dtype)
    trl_logits._warned.clear()
    with pytest.warns(UserWarning, match=r"\[\.\.\., K\]"):
        actual = ft.selective_log_softmax(logits, index)
    assert actual.shape == (4, 32, k)
    assert torch.equal(actual, _trl("selective_log_softmax")(logits, index))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [pytest.param((3, 7, 257), id="B,T,odd-V"),
                                   pytest.param((5, 1), id="V=1"), pytest.param((1, 1, 50), id="T=1")])
def test_logits_helpers_match_trl(dtype, shape):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(*shape, generator=g) * 2).to(dtype).requires_grad_()
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    row_mask = torch.rand(shape[:-1], generator=g) > 0.3
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    w = torch.rand(shape[:-1], generator=g)  # upstream weights for the gradient check

    def both(name, *args, **kw):
        res = []
        for fn in (_trl(name), getattr(ft, name)):
            out = fn(logits, *args, **kw)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum((o.float() * w).sum() for o in outs if o.requires_grad)
            res.append((outs, torch.autograd.grad(loss, logits)[0]))
        return res

    for name, args, kw in [("selective_log_softmax", (index,), {}),
                           ("selective_log_softmax", (index,), dict(temperature=0.6, row_mask=row_mask)),
                           ("entropy_from_logits", (), {}),
                           ("selective_log_softmax_and_entropy", (index,), dict(temperature=1.4, row_mask=row_mask)),
                           ("selective_log_softmax_and_entropy", (index,), dict(entropy_requires_grad=False))]:
        (want, want_g), (got, got_g) = both(name, *args, **kw)
        for a, b in zip(want, got):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
            torch.testing.assert_close(b, a, **tol, msg=f"{name} {kw}")
        torch.testing.assert_close(got_g, want_g, **tol)
    with pytest.raises(ValueError, match="temperature must be positive"):
        ft.selective_log_softmax(logits, index, temperature=0.0)


# ----------------------------------------------------------------------------- the switch
def _snapshot():
    return {(name, attr): id(value)
            for name, mod in list(sys.modules.items()) if mod is not None and (name == "trl" or name.startswith("trl."))
            for attr, value in list(vars(mod).items())}


def test_enable_disable_restores_every_trl_attribute():
    import trl.experimental.sdpo.loss_utils as sdpo  # noqa: F401  (a by-name copy of selective_log_softmax)
    before = _snapshot()
    ft.disable()  # without enable: a no-op
    assert _snapshot() == before and not ft.is_enabled()
    ft.enable()
    ft.enable()  # idempotent
    assert ft.is_enabled()
    assert trl_utils._ChunkedLogProbFunction is ft.FastpoChunkedLogProb
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_kernel._use_triton(torch.device("cpu")) is False  # TRL's kernel keeps its own dispatch
    for name in ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"):
        assert getattr(trl_utils, name) is getattr(ft, name)
    assert sys.modules["trl.experimental.sdpo.loss_utils"].selective_log_softmax is ft.selective_log_softmax
    # a trl module imported while enabled copies the replacement by name; disable restores it too
    late = types.ModuleType("trl._fastpo_late_import")
    late.selective_log_softmax = trl_utils.selective_log_softmax
    sys.modules[late.__name__] = late
    try:
        ft.disable()
        assert late.selective_log_softmax is ft.original("selective_log_softmax")
        del late.selective_log_softmax
    finally:
        del sys.modules[late.__name__]
    ft.disable()
    assert _snapshot() == before


def test_patched_restores_on_exception_and_nests():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with ft.patched():
            assert trl_utils._ChunkedLogProbFunction is ft.FastpoChunkedLogProb
            raise RuntimeError("boom")
    assert _snapshot() == before and not ft.is_enabled()
    ft.enable()
    with ft.patched():
        pass
    assert ft.is_enabled()  # the outer enable() still holds
    ft.disable()
    assert _snapshot() == before


def test_head_frozen_weight_gives_hidden_grad_only():
    """PEFT freezes the lm_head: only hidden needs a gradient (TRL's needs_input_grad rule)."""
    hidden, weight, bias, targets = _head_inputs(12, 8, 29, torch.float32, bias=True)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    grads = []
    for f in (TRL_HEAD, ft.FastpoChunkedLogProb):
        out = f.apply(hidden, weight, bias, targets, 0.9, 32768, None, 1.0, ("entropy",))
        grads.append(torch.autograd.grad(out[0].sum() + out[1].sum(), hidden)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
