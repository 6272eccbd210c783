"""The compiled CPU kernels (fastpo._C_cpu via fastpo.kernels.cpp) against the float64
reference and the chunked torch forward/backward; plus the contract's exact-zero,
in-place, stride, determinism and batch-invariance properties."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_labels, make_logits, rel_err
from fastpo.kernels import cpp
from fastpo.reference import token_logprobs_chunked_bwd, token_logprobs_chunked_fwd, token_logprobs_ref

pytestmark = pytest.mark.skipif(not cpp.cpu_available(), reason="fastpo._C_cpu is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 17: shorter than one SIMD pack plus a ragged tail; 1000: one partial chunk;
# 4099: several chunks and a 3-element tail; 32000: a real vocabulary (Llama 2).
VOCABS = [17, 1000, 4099, 32000]
IGNORE = -100


def _fwd_tol(dtype):  # inputs are exact in every dtype once upcast: only accumulation error
    return 1e-12 if dtype == torch.float64 else 1e-5


def _grad_tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1.5e-2)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_with_grad(logits, labels, temperature, grad_logp, grad_entropy):
    """float64 oracle on the upcast inputs: (logp, entropy, d/dlogits)."""
    z = logits.detach().to(torch.float64, copy=True).requires_grad_()
    logp, ent = token_logprobs_ref(z, labels, temperature=temperature, ignore_index=IGNORE)
    loss = (logp * grad_logp.double()).sum()
    if grad_entropy is not None:
        loss = loss + (ent * grad_entropy.double()).sum()
    loss.backward()
    return logp.detach(), ent.detach(), z.grad


def _case(n, v, dtype, seed=0):
    logits = make_logits((n, v), dtype, seed=seed)
    labels = make_labels((n,), v, seed=seed + 1)
    labels[1] = IGNORE  # always at least one ignored row
    g = torch.Generator().manual_seed(seed + 2)
    grad_logp = torch.randn(n, generator=g, dtype=torch.float64).to(_acc(dtype))
    grad_ent = torch.randn(n, generator=g, dtype=torch.float64).to(_acc(dtype))
    return logits, labels, grad_logp, grad_ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(dtype, vocab, temperature):
    logits, labels, gl, ge = _case(9, vocab, dtype)
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, temperature, IGNORE)
    assert logp.dtype == ent.dtype == lse.dtype == _acc(dtype)
    for grad_ent in (ge, None):
        ref_logp, ref_ent, ref_grad = _ref_with_grad(logits, labels, temperature, gl, grad_ent)
        assert rel_err(logp, ref_logp) <= _fwd_tol(dtype)
        assert rel_err(ent, ref_ent) <= _fwd_tol(dtype)
        grad = cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, grad_ent, temperature, IGNORE,
                                      torch.empty_like(logits))
        assert grad.dtype == dtype
        assert rel_err(grad, ref_grad) <= _grad_tol(dtype)


@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_chunked_torch_backend(dtype, vocab):
    """Second oracle: the torch backend's forward/backward, same signature, same dtype."""
    logits, labels, gl, ge = _case(9, vocab, dtype, seed=3)
    ours = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    theirs = token_logprobs_chunked_fwd(logits, labels, 0.7, IGNORE)
    keep = labels != IGNORE
    for a, b in zip(ours, theirs):
        assert rel_err(a[keep], b[keep]) <= _fwd_tol(dtype)
    g_ours = cpp.token_logprobs_bwd(logits, labels, ours[2], ours[1], gl, ge, 0.7, IGNORE, torch.empty_like(logits))
    g_theirs = token_logprobs_chunked_bwd(logits, labels, theirs[2], theirs[1], gl, ge, 0.7, IGNORE,
                                          torch.empty_like(logits))
    assert rel_err(g_ours, g_theirs) <= _grad_tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignored_rows_are_exact_zeros_and_never_read(dtype):
    logits, labels, gl, ge = _case(6, 1000, dtype)
    labels[[0, 3]] = IGNORE
    logits[[0, 3]] = float("nan")  # an ignored row must not be read
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, 1.0, IGNORE)
    for out in (logp, ent, lse):
        assert torch.equal(out[[0, 1, 3]], torch.zeros(3, dtype=out.dtype))
        assert torch.isfinite(out).all()
    grad = cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, ge, 1.0, IGNORE, torch.full_like(logits, 7.0))
    assert torch.equal(grad[[0, 1, 3]], torch.zeros(3, 1000, dtype=dtype))
    assert torch.isfinite(grad).all()


def test_custom_ignore_index():
    logits, labels, gl, _ = _case(5, 300, torch.float32)
    labels[2] = -1
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, 1.0, -1)
    assert logp[2] == 0 and ent[2] == 0
    ref = cpp.token_logprobs_fwd(logits[[0]], labels[[0]], 1.0, -1)[0]
    assert torch.equal(logp[[0]], ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_equals_out_of_place(dtype):
    logits, labels, gl, ge = _case(9, 4099, dtype)
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    out_of_place = cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, ge, 0.7, IGNORE, torch.empty_like(logits))
    buf = logits.clone()
    in_place = cpp.token_logprobs_bwd(buf, labels, lse, ent, gl, ge, 0.7, IGNORE, buf)
    assert in_place.data_ptr() == buf.data_ptr()
    assert torch.equal(in_place, out_of_place)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_strides(dtype):
    """Rows inside a wider buffer (odd row stride) and a grad buffer with its own stride."""
    logits, labels, gl, ge = _case(7, 1000, dtype)
    wide = torch.zeros(7, 1013, dtype=dtype)
    wide[:, 5:1005] = logits
    view = wide[:, 5:1005]
    assert view.stride(0) == 1013 and not view.is_contiguous()
    a = cpp.token_logprobs_fwd(logits, labels, 1.0, IGNORE)
    b = cpp.token_logprobs_fwd(view, labels, 1.0, IGNORE)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    g_contig = cpp.token_logprobs_bwd(logits, labels, a[2], a[1], gl, ge, 1.0, IGNORE, torch.empty_like(logits))
    g_wide = torch.full((7, 1200), 3.0, dtype=dtype)
    cpp.token_logprobs_bwd(view, labels, a[2], a[1], gl, ge, 1.0, IGNORE, g_wide[:, 100:1100])
    assert torch.equal(g_wide[:, 100:1100], g_contig)
    assert (g_wide[:, :100] == 3).all() and (g_wide[:, 1100:] == 3).all()  # nothing written outside


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_streaming_stores(dtype, monkeypatch):
    """Large out-of-place gradients use non-temporal stores (forced here for a small
    one): same bits as the in-place path, at any grad alignment, nothing written outside."""
    monkeypatch.setenv("FASTPO_CPU_STREAM_MIN_BYTES", "0")
    logits, labels, gl, ge = _case(9, 4099, dtype)
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    buf = logits.clone()
    expected = cpp.token_logprobs_bwd(buf, labels, lse, ent, gl, ge, 0.7, IGNORE, buf)  # in place: never streamed
    for offset in (0, 1, 3, 5):
        wide = torch.full((9, 4099 + 16), 5.0, dtype=dtype)
        view = wide[:, offset:offset + 4099]
        cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, ge, 0.7, IGNORE, view)
        assert torch.equal(view, expected)
        assert (wide[:, :offset] == 5).all() and (wide[:, offset + 4099:] == 5).all()
    seq_logits, seq_labels = logits.view(3, 3, 4099), labels.view(3, 3)
    _, seq_lse = cpp.sequence_logprobs_fwd(seq_logits, seq_labels, 0.7, IGNORE, True)
    go = gl[:3].clone()
    in_place = seq_logits.clone()
    cpp.sequence_logprobs_bwd(in_place, seq_labels, seq_lse, go, 0.7, IGNORE, True, in_place)
    out = cpp.sequence_logprobs_bwd(seq_logits, seq_labels, seq_lse, go, 0.7, IGNORE, True, torch.empty_like(in_place))
    assert torch.equal(out, in_place)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_entropy_grad_none_equals_zero_grad(dtype):
    logits, labels, gl, _ = _case(9, 1000, dtype)
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, 1.0, IGNORE)
    g_none = cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, None, 1.0, IGNORE, torch.empty_like(logits))
    g_zero = cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, torch.zeros_like(gl), 1.0, IGNORE,
                                    torch.empty_like(logits))
    assert torch.equal(g_none, g_zero)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_and_batch_invariant(dtype):
    logits, labels, gl, ge = _case(9, 4099, dtype)
    labels[4] = 11
    full = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    again = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    alone = cpp.token_logprobs_fwd(logits[4:5].clone(), labels[4:5].clone(), 0.7, IGNORE)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    finally:
        torch.set_num_threads(threads)
    for f, a, s, o in zip(full, again, alone, one_thread):
        assert torch.equal(f, a) and torch.equal(f, o)
        assert torch.equal(f[4:5], s)
    g_full = cpp.token_logprobs_bwd(logits, labels, full[2], full[1], gl, ge, 0.7, IGNORE, torch.empty_like(logits))
    g_alone = cpp.token_logprobs_bwd(logits[4:5].clone(), labels[4:5].clone(), alone[2], alone[1], gl[4:5].clone(),
                                     ge[4:5].clone(), 0.7, IGNORE, torch.empty(1, 4099, dtype=dtype))
    assert torch.equal(g_full[4:5], g_alone)


def test_masked_vocabulary_entries():
    """-inf logits (a masked vocabulary) contribute nothing and give finite results, zero grads."""
    logits, labels, gl, ge = _case(4, 500, torch.float32)
    labels[:] = torch.tensor([3, IGNORE, 7, 499])
    masked = logits.clone()
    masked[:, 100:300] = float("-inf")
    logp, ent, lse = cpp.token_logprobs_fwd(masked, labels, 1.0, IGNORE)
    grad = cpp.token_logprobs_bwd(masked, labels, lse, ent, gl, ge, 1.0, IGNORE, torch.empty_like(masked))
    keep = torch.cat([torch.arange(100), torch.arange(300, 500)])
    sub_labels = torch.tensor([3, IGNORE, 7, 299])
    ref_logp, ref_ent, ref_grad = _ref_with_grad(logits[:, keep], sub_labels, 1.0, gl, ge)
    assert rel_err(logp, ref_logp) <= 1e-5 and rel_err(ent, ref_ent) <= 1e-5
    assert torch.isfinite(grad).all() and (grad[:, 100:300] == 0).all()
    assert rel_err(grad[:, keep], ref_grad) <= 1e-5


def test_nan_logit_propagates():
    logits, labels, _, _ = _case(3, 100, torch.float32)
    labels[:] = 5
    logits[1, 50] = float("nan")
    logp, ent, _ = cpp.token_logprobs_fwd(logits, labels, 1.0, IGNORE)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2]]).all()


def test_rejects_bad_layouts():
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError):
        cpp.token_logprobs_fwd(torch.zeros(4, 8, dtype=torch.int32), labels, 1.0, IGNORE)
    with pytest.raises(ValueError):
        cpp.token_logprobs_fwd(torch.zeros(8, 4).t(), labels, 1.0, IGNORE)


_ISA_SCRIPT = """
import torch
from fastpo.kernels import cpp
from fastpo.reference import token_logprobs_ref
import fastpo._C_cpu as m
print(m.isa())
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    z = (torch.randn(5, 1037, dtype=torch.float64) * 3).to(dtype)
    y = torch.tensor([1, -100, 1036, 7, 500])
    logp, ent, lse = cpp.token_logprobs_fwd(z, y, 0.7, -100)
    zr = z.double().requires_grad_()
    rl, re = token_logprobs_ref(zr, y, temperature=0.7)
    (rl.sum() + re.sum()).backward()
    g = cpp.token_logprobs_bwd(z, y, lse, ent, torch.ones(5), torch.ones(5), 0.7, -100, torch.empty_like(z))
    err = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    assert err(logp, rl) < 1e-5 and err(ent, re) < 1e-5, dtype
    assert err(g, zr.grad) < (1e-5 if dtype == torch.float32 else 1.5e-2), dtype
    # streamed (FASTPO_CPU_STREAM_MIN_BYTES=0), misaligned out-of-place grad == in place
    buf = z.clone()
    cpp.token_logprobs_bwd(buf, y, lse, ent, torch.ones(5), None, 0.7, -100, buf)
    wide = torch.empty(5, 1040, dtype=dtype)
    cpp.token_logprobs_bwd(z, y, lse, ent, torch.ones(5), None, 0.7, -100, wide[:, 3:])
    assert torch.equal(wide[:, 3:], buf), dtype
    # NaN in the first pack, and in a row that is -inf elsewhere, in the pack and the ragged tail
    bad = z.clone()
    bad[0, 1], bad[2] = float("nan"), float("-inf")
    bad[2, 1030] = float("nan")
    lp2, ent2, lse2 = cpp.token_logprobs_fwd(bad, y, 0.7, -100)
    assert lse2[[0, 2]].isnan().all() and ent2[[0, 2]].isnan().all() and torch.equal(lse2[3:], lse[3:]), dtype
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_instruction_set_variant(isa):
    """The portable and AVX2 builds of the row kernels (this CPU may pick AVX-512)."""
    env = dict(os.environ, FASTPO_CPU_ISA=isa, FASTPO_CPU_STREAM_MIN_BYTES="0")
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] in (isa, "baseline")


# ------------------------------------------------------------- sequence_logprobs
def _seq_case(b, t, v, dtype, seed=0):
    logits = make_logits((b, t, v), dtype, seed=seed)
    labels = make_labels((b, t), v, seed=seed + 1, ignore_frac=0.3)
    labels[-1] = IGNORE  # a sequence with no kept token
    labels[0, 0] = 1
    grad_out = torch.randn(b, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return logits, labels, grad_out.to(_acc(dtype))


def _seq_ref(logits, labels, temperature, average, grad_out):
    z = logits.detach().to(torch.float64, copy=True).requires_grad_()
    logp, _ = token_logprobs_ref(z, labels, temperature=temperature, ignore_index=IGNORE)
    out = logp.sum(-1)
    if average:
        out = out / (labels != IGNORE).sum(-1).clamp(min=1)
    (out * grad_out.double()).sum().backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("vocab", [17, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_logprobs_matches_reference(dtype, vocab, average):
    logits, labels, grad_out = _seq_case(4, 6, vocab, dtype)
    out, lse = cpp.sequence_logprobs_fwd(logits, labels, 0.7, IGNORE, average)
    ref, ref_grad = _seq_ref(logits, labels, 0.7, average, grad_out)
    assert out.shape == (4,) and lse.shape == (4, 6) and out.dtype == _acc(dtype)
    assert rel_err(out, ref) <= _fwd_tol(dtype)
    assert out[-1] == 0
    grad = cpp.sequence_logprobs_bwd(logits, labels, lse, grad_out, 0.7, IGNORE, average, torch.empty_like(logits))
    assert rel_err(grad, ref_grad) <= _grad_tol(dtype)
    assert torch.equal(grad[labels == IGNORE], torch.zeros_like(grad[labels == IGNORE]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_logprobs_agrees_with_token_kernels(dtype):
    """Same lse bits and (for the sum) the same gradient bits as token_logprobs."""
    logits, labels, grad_out = _seq_case(3, 5, 1000, dtype)
    _, lse = cpp.sequence_logprobs_fwd(logits, labels, 1.0, IGNORE, False)
    flat, flat_labels = logits.reshape(15, 1000), labels.reshape(15)
    logp, ent, tok_lse = cpp.token_logprobs_fwd(flat, flat_labels, 1.0, IGNORE)
    assert torch.equal(lse.reshape(15), tok_lse)
    grad = cpp.sequence_logprobs_bwd(logits, labels, lse, grad_out, 1.0, IGNORE, False, torch.empty_like(logits))
    tok_grad = cpp.token_logprobs_bwd(flat, flat_labels, tok_lse, ent, grad_out.repeat_interleave(5), None, 1.0,
                                      IGNORE, torch.empty_like(flat))
    assert torch.equal(grad.reshape(15, 1000), tok_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_logprobs_strides_inplace_and_batch_invariance(dtype):
    logits, labels, grad_out = _seq_case(3, 5, 1000, dtype)
    tbv = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, V] with stride_b = V, stride_t = B V
    assert tbv.stride()[:2] == (1000, 3000)
    for average in (False, True):
        out, lse = cpp.sequence_logprobs_fwd(logits, labels, 1.0, IGNORE, average)
        out_s, lse_s = cpp.sequence_logprobs_fwd(tbv, labels, 1.0, IGNORE, average)
        one, _ = cpp.sequence_logprobs_fwd(logits[1:2].clone(), labels[1:2].clone(), 1.0, IGNORE, average)
        assert torch.equal(out, out_s) and torch.equal(lse, lse_s) and torch.equal(out[1:2], one)
        grad = cpp.sequence_logprobs_bwd(logits, labels, lse, grad_out, 1.0, IGNORE, average,
                                         torch.empty_like(logits))
        buf = tbv.clone().transpose(0, 1).contiguous().transpose(0, 1)
        cpp.sequence_logprobs_bwd(buf, labels, lse, grad_out, 1.0, IGNORE, average, buf)  # in place, strided
        assert torch.equal(buf, grad)


# ------------------------------------------------- the fused policy loss (csrc/policy_math.h)
@pytest.mark.parametrize("config", [  # every ppo branch (clip-higher, cap, dual clip, clamps, k3, entropy); cispo
    dict(clip_high=0.28, ratio_cap=1.5, dual_clip=2.0, logratio_clamp=1.0, kl_coef=0.25, kl_estimator="k3",
         kl_clamp=2.0, entropy_coef=0.0625, temperature=0.7),
    dict(variant="cispo", clip_low=1.0, clip_high=4.0, kl_coef=0.25, kl_estimator="k2+")], ids=["ppo", "cispo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_fwd_matches_triton_launcher(dtype, config):
    """Same inputs, same args: the CPU launcher against the Triton one (interpreter); ignored
    rows (NaN logits) are never read and give exact zeros; no grad_out leaves the values alone."""
    pytest.importorskip("triton")
    from fastpo import PolicyLossConfig
    from fastpo.kernels.policy_args import PolicyKernelArgs
    from fastpo.kernels.policy_loss import policy_loss_fwd as triton_policy_loss_fwd

    logits, labels, _, _ = _case(8, 4099, dtype, seed=5)
    labels[6] = IGNORE
    logits[[1, 6]] = float("nan")
    g = torch.Generator().manual_seed(9)
    lp = token_logprobs_ref(logits.double(), labels)[0]
    old, ref = ((lp + 0.6 * torch.randn(8, generator=g, dtype=torch.float64)).float() for _ in range(2))
    adv, weight = torch.randn(8, generator=g), torch.rand(8, generator=g)
    args = PolicyKernelArgs.from_config(PolicyLossConfig(**config), has_ref=True, ignore_index=IGNORE)
    grad, grad_triton = torch.full_like(logits, 7.0), torch.empty_like(logits)
    ours = cpp.policy_loss_fwd(logits, labels, old, adv, ref, weight, args, grad)
    theirs = triton_policy_loss_fwd(logits, labels, old, adv, ref, weight, args, grad_triton)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32 and torch.equal(a[[1, 6]], torch.zeros(2)) and torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-5
    assert torch.equal(grad[[1, 6]], torch.zeros(2, 4099, dtype=dtype)) and torch.isfinite(grad).all()
    assert rel_err(grad, grad_triton) <= _grad_tol(dtype)
    for a, b in zip(cpp.policy_loss_fwd(logits, labels, old, adv, ref, weight, args, None), ours):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="variant"):
        cpp.policy_loss_fwd(logits, labels, old, adv, ref, weight, dataclasses.replace(args, variant=1), None)


# ------------------------------------------------- the CUDA module (needs a GPU)
_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cpp.cuda_available()),
                           reason="needs a CUDA device and fastpo._C_cuda")


@_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [17, 4099, 32000])  # 17 / 4099: scalar loads; 32000: 16-byte loads
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_token_logprobs(dtype, vocab):
    logits, labels, gl, ge = _case(9, vocab, dtype)
    labels[4] = 3
    ref_logp, ref_ent, ref_grad = _ref_with_grad(logits, labels, 0.7, gl, ge)
    dev = [t.cuda() for t in (logits, labels, gl, ge)]
    logp, ent, lse = cpp.token_logprobs_fwd(dev[0], dev[1], 0.7, IGNORE)
    assert rel_err(logp.cpu(), ref_logp) <= _fwd_tol(dtype) and rel_err(ent.cpu(), ref_ent) <= _fwd_tol(dtype)
    assert logp[1] == 0 and ent[1] == 0 and lse[1] == 0
    grad = cpp.token_logprobs_bwd(dev[0], dev[1], lse, ent, dev[2], dev[3], 0.7, IGNORE, torch.empty_like(dev[0]))
    assert rel_err(grad.cpu(), ref_grad) <= _grad_tol(dtype)
    assert (grad[1] == 0).all()
    buf = dev[0].clone()
    cpp.token_logprobs_bwd(buf, dev[1], lse, ent, dev[2], dev[3], 0.7, IGNORE, buf)
    assert torch.equal(buf, grad)
    alone = cpp.token_logprobs_fwd(dev[0][4:5].clone(), dev[1][4:5].clone(), 0.7, IGNORE)
    for full, one in zip((logp, ent, lse), alone):
        assert torch.equal(full[4:5], one)


@_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sequence_logprobs(dtype, average):
    logits, labels, grad_out = _seq_case(4, 6, 4096, dtype)
    ref, ref_grad = _seq_ref(logits, labels, 0.7, average, grad_out)
    out, lse = cpp.sequence_logprobs_fwd(logits.cuda(), labels.cuda(), 0.7, IGNORE, average)
    assert rel_err(out.cpu(), ref) <= _fwd_tol(dtype) and out[-1] == 0
    grad = cpp.sequence_logprobs_bwd(logits.cuda(), labels.cuda(), lse, grad_out.cuda(), 0.7, IGNORE, average,
                                     torch.empty_like(logits.cuda()))
    assert rel_err(grad.cpu(), ref_grad) <= _grad_tol(dtype)
