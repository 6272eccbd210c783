"""``linear_token_logprobs`` with a frozen head (only hidden requires a gradient, e.g. LoRA) and
no entropy output: the forward forms each kept row's d logp / d hidden and the backward only
scales it (2 GEMMs per chunk in all instead of 3). Against the float64 composition on every
backend and dtype (odd V and H, ignored rows, temperature, softcap, logit_scale, chunk sizes that
do not divide the kept rows, extra outputs requested); gradcheck in float64; the backward runs no
GEMM, and the paths that need the recompute (entropy returned, a head that trains) still take it."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastpo
from fastpo.functional.linear import linear_sequence_logprobs, linear_token_logprobs
from conftest import backend_params, make_labels, rel_err
from test_linear_ops import TOL, grad_bounds, make_head, materialise

BACKENDS = backend_params("token_logprobs")
CASES = [
    # id, leading shape, H, V, options
    ("V37-bias-chunk3", (2, 5), 7, 37, dict(chunk_size=3, temperature=0.7)),
    ("V257-softcap-scale-chunk1-extras", (2, 3), 5, 257,
     dict(chunk_size=1, softcap=4.0, logit_scale=0.5, return_mean_logits=True, return_is_top1=True)),
    ("flat-nobias-onechunk", (12,), 7, 37, dict(chunk_size=None, bias=False)),
]


def _frozen(shape, hidden_size, vocab, dtype, bias):
    hidden, weight, b = make_head(shape, hidden_size, vocab, dtype, bias=bias)
    return hidden, weight.detach(), None if b is None else b.detach()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,shape,hidden_size,vocab,opts", CASES, ids=[c[0] for c in CASES])
def test_frozen_head_vs_float64(device, backend, dtype, name, shape, hidden_size, vocab, opts):
    opts = dict(opts)
    hidden, weight, bias = _frozen(shape, hidden_size, vocab, dtype, opts.pop("bias", True))
    labels = make_labels(shape, vocab, ignore_frac=0.25)
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, **opts)
    logp = out[0] if isinstance(out, tuple) else out
    u = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    temperature = opts.get("temperature", 1.0)

    def composed(x):
        lp = fastpo.token_logprobs(x, labels, temperature=temperature, backend="torch")
        return lp, (lp.double() * u).sum()

    cap = dict(softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale", 1.0))
    leaves, x = materialise(hidden, weight, bias, **cap)
    logp_r, loss_r = composed(x)
    assert rel_err(logp, logp_r) <= TOL[dtype]
    (got,) = torch.autograd.grad((logp.double() * u).sum(), hidden)
    (want,) = torch.autograd.grad(loss_r, leaves[0])
    (bound,) = grad_bounds(dtype, [want], lambda xb: composed(xb)[1], (hidden, weight, bias), cap)[:1]
    assert got.dtype == dtype and got.shape == hidden.shape
    assert rel_err(got, want) <= bound, (rel_err(got, want), bound)
    assert (got.reshape(-1, hidden_size)[labels.reshape(-1) == -100] == 0).all()


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton"])
def test_frozen_head_gradcheck(device, backend):
    hidden, weight, bias = _frozen((2, 3), 3, 5, torch.float64, True)
    labels = torch.tensor([[0, 4, -100], [2, 1, 3]])

    def token(h):
        return linear_token_logprobs(h, weight, labels, bias=bias, softcap=2.0, temperature=0.5, chunk_size=2,
                                     backend=backend)

    def sequence(h):
        return linear_sequence_logprobs(h, weight, labels, bias=bias, temperature=0.5, chunk_size=2, backend=backend)

    for fn in (token, sequence):
        assert torch.autograd.gradcheck(fn, (hidden,), atol=1e-8, rtol=1e-6)


def _gemms(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gemm_count(device, backend):
    """Frozen head, log-probs only: 2 GEMMs per chunk in the forward, none in the backward. With
    the entropy returned, or a head that trains, the backward recomputes (1 + 1 or 1 + 2)."""
    labels = make_labels((2, 6), 37, ignore_frac=0.0)
    chunks = 3  # 12 kept rows, chunk_size 4

    def run(weight_grad, entropy):
        hidden, weight, bias = make_head((2, 6), 7, 37, torch.float32)
        if not weight_grad:
            weight, bias = weight.detach(), bias.detach()
        out = {}

        def forward():
            got = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=entropy, chunk_size=4,
                                        backend=backend)
            out["loss"] = (got[0] + got[1]).sum() if entropy else got.sum()

        fwd = _gemms(forward)
        bwd = _gemms(lambda: out["loss"].backward())
        return fwd, bwd

    assert run(False, False) == (2 * chunks, 0)
    assert run(False, True) == (chunks, 2 * chunks)  # recompute + dL/dhidden
    assert run(True, False) == (chunks, 3 * chunks)  # recompute + dL/dhidden + dL/dweight


def test_trl_served_head_with_a_frozen_head():
    """TRL's fused head with PEFT (frozen lm_head), log-probs only: the served head takes the
    frozen-head path (no logits kept, no GEMM in the backward) and equals TRL's function."""
    pytest.importorskip("trl")
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from fastpo.integrations.trl_head import FastpoChunkedLogProb

    hidden, weight, bias = _frozen((24,), 16, 301, torch.float32, True)
    targets = make_labels((24,), 301, ignore_frac=0.0)
    up = torch.randn(24, generator=torch.Generator().manual_seed(5))
    got = {}
    for name, fn in (("fastpo", FastpoChunkedLogProb), ("trl", ChunkedLogProbFunction)):
        out = {}

        def forward(fn=fn, out=out):
            out["lp"] = fn.apply(hidden, weight, bias, targets, 0.7, 32768, None, 1.0, ())[0]

        fwd = _gemms(forward)
        bwd = _gemms(lambda out=out: out.update(g=torch.autograd.grad((out["lp"] * up).sum(), hidden)[0]))
        got[name] = (out["lp"].detach(), out["g"], fwd, bwd)
    assert got["fastpo"][2:] == (2, 0)  # one chunk: logits + Jacobian GEMMs; nothing in the backward
    torch.testing.assert_close(got["fastpo"][0], got["trl"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["fastpo"][1], got["trl"][1], rtol=1e-4, atol=1e-6)
