"""The compiled CPU kernels (fastpo._C_cpu via fastpo.kernels.cpp), issue 8: NaN / -inf
logits, out-of-range labels, the 3-D shift view, and the task split and huge-page advice
behind the tail-latency fix (defect 12)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_labels, make_logits, rel_err
from fastpo.kernels import cpp
from test_csrc_cpu import DTYPES, IGNORE, _acc, _case, _fwd_tol

pytestmark = pytest.mark.skipif(not cpp.cpu_available(), reason="fastpo._C_cpu is not built")


# ------------------------------------------------- issue 8: NaN, -inf, bad labels, 3-D views
def _f64_token(logits, labels, temperature):
    """float64 logp / entropy with 0 log 0 = 0 (-inf logits allowed); the label's row only."""
    lp = torch.log_softmax(logits.double() / temperature, -1)
    p = lp.exp()
    ent = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
    return lp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), ent


# columns: the first pack (0, 1, 7), a chunk boundary of the CPU kernels (1023 / 1024), the last
@pytest.mark.parametrize("vocab", [17, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_anywhere_in_a_kept_row(dtype, vocab):
    cols = sorted({c for c in (0, 1, 7, 1023, 1024, vocab - 1) if c < vocab})
    logits, labels, gl, _ = _case(len(cols) + 3, vocab, dtype)
    labels[:] = 3
    clean = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    bad = logits.clone()
    for r, col in enumerate(cols):
        bad[r, col] = float("nan")
    bad[len(cols)] = float("-inf")  # a row that is -inf but for one NaN: no finite max at all
    bad[len(cols), vocab // 2] = float("nan")
    nan_rows = len(cols) + 1
    logp, ent, lse = cpp.token_logprobs_fwd(bad, labels, 0.7, IGNORE)
    for out, ref in zip((logp, ent, lse), clean):
        assert torch.isnan(out[:nan_rows]).all(), out
        assert torch.equal(out[nan_rows:], ref[nan_rows:])  # the other rows are untouched
    seq, _ = cpp.sequence_logprobs_fwd(bad[:nan_rows + 2].view(-1, 1, vocab), labels[:nan_rows + 2].view(-1, 1),
                                       0.7, IGNORE, False)
    assert torch.isnan(seq[:nan_rows]).all() and torch.isfinite(seq[nan_rows:]).all()
    args = _policy_args(temperature=0.7)
    zeros = torch.zeros(len(labels), dtype=_acc(dtype))
    loss, lp2, ent2 = cpp.policy_loss_fwd(bad, labels, zeros - 5, zeros + 1, None, zeros + 1, args,
                                          torch.empty_like(bad))
    assert torch.isnan(loss[:nan_rows]).all() and torch.isnan(ent2[:nan_rows]).all()
    assert torch.isfinite(loss[nan_rows:]).all() and torch.equal(lp2[nan_rows:], clean[0][nan_rows:])


def test_nan_in_a_large_odd_vocabulary():
    logits = make_logits((1, 50257), torch.bfloat16)
    for col in (0, 1, 7, 1023, 1024, 50256):
        bad = logits.clone()
        bad[0, col] = float("nan")
        logp, ent, _ = cpp.token_logprobs_fwd(bad, torch.tensor([5]), 1.0, IGNORE)
        assert torch.isnan(logp).all() and torch.isnan(ent).all(), col


def _policy_args(**kw):
    from fastpo import PolicyLossConfig
    from fastpo.kernels.policy_args import PolicyKernelArgs

    return PolicyKernelArgs.from_config(PolicyLossConfig(**kw), has_ref=False, ignore_index=IGNORE)


@pytest.mark.parametrize("vocab", [17, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neg_inf_masked_vocabulary_is_exact(dtype, vocab):
    """Half of each row at -inf, and one row with a single finite entry: float64 values, and an
    exactly zero gradient on the -inf entries in every kernel (token, policy, sequence, in place)."""
    n = 6
    logits, labels, gl, ge = _case(n, vocab, dtype, seed=11)
    g = torch.Generator().manual_seed(4)
    masked = torch.rand(n, vocab, generator=g) < 0.5
    masked[-1] = True
    masked[-1, vocab // 3] = False
    for r in range(n):
        labels[r] = int(torch.nonzero(~masked[r])[0])
    labels[1] = IGNORE
    x = logits.masked_fill(masked, float("-inf"))
    logp, ent, lse = cpp.token_logprobs_fwd(x, labels, 0.7, IGNORE)
    ref_lp, ref_h = _f64_token(x, labels, 0.7)
    keep = labels != IGNORE
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert rel_err(logp[keep], ref_lp[keep]) <= _fwd_tol(dtype) and rel_err(ent[keep], ref_h[keep]) <= 1e-5
    assert logp[-1].abs() <= 1e-6 and ent[-1].abs() <= 1e-6  # one finite entry: p = 1, H = 0
    grad = cpp.token_logprobs_bwd(x, labels, lse, ent, gl, ge, 0.7, IGNORE, torch.empty_like(x))
    assert torch.isfinite(grad).all() and (grad[masked] == 0).all()
    buf = x.clone()
    cpp.token_logprobs_bwd(buf, labels, lse, ent, gl, ge, 0.7, IGNORE, buf)
    assert torch.equal(buf, grad)
    zeros = torch.zeros(n, dtype=_acc(dtype))
    pgrad = torch.empty_like(x)
    loss, plp, pent = cpp.policy_loss_fwd(x, labels, zeros - 1, zeros + 1, None, zeros + 1,
                                          _policy_args(entropy_coef=0.1, temperature=0.7), pgrad)
    assert torch.equal(plp, logp) and torch.equal(pent, ent) and torch.isfinite(loss).all()
    assert torch.isfinite(pgrad).all() and (pgrad[masked] == 0).all()
    out, slse = cpp.sequence_logprobs_fwd(x.view(2, 3, vocab), labels.view(2, 3), 0.7, IGNORE, True)
    assert torch.isfinite(out).all() and torch.equal(slse.view(-1), lse)
    sgrad = cpp.sequence_logprobs_bwd(x.view(2, 3, vocab), labels.view(2, 3), slse, out, 0.7, IGNORE, True,
                                      torch.empty_like(x).view(2, 3, vocab))
    assert torch.isfinite(sgrad).all() and (sgrad.view(n, vocab)[masked] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_of_range_labels_give_nan_and_are_never_read(dtype):
    """The Python layer raises first; a kernel handed one anyway must not read row[y]."""
    logits, labels, gl, ge = _case(6, 300, dtype)
    labels[:] = torch.tensor([3, 300, -1, 2**40, -(2**40), IGNORE])
    logp, ent, lse = cpp.token_logprobs_fwd(logits, labels, 1.0, IGNORE)
    assert torch.isnan(logp[1:5]).all() and torch.isnan(ent[1:5]).all() and torch.isnan(lse[1:5]).all()
    assert torch.isfinite(logp[[0, 5]]).all()
    grad = cpp.token_logprobs_bwd(logits, labels, lse, ent, gl, ge, 1.0, IGNORE, torch.zeros_like(logits))
    assert torch.isnan(grad[1:5]).all() and torch.isfinite(grad[0]).all() and (grad[5] == 0).all()
    zeros = torch.zeros(6)
    pgrad = torch.zeros_like(logits)
    loss, plp, _ = cpp.policy_loss_fwd(logits, labels, zeros, zeros + 1, None, zeros + 1, _policy_args(), pgrad)
    assert torch.isnan(loss[1:5]).all() and torch.isnan(plp[1:5]).all() and torch.isnan(pgrad[1:5]).all()
    assert torch.isfinite(loss[[0, 5]]).all()
    out, slse = cpp.sequence_logprobs_fwd(logits.view(3, 2, 300), labels.view(3, 2), 1.0, IGNORE, False)
    assert torch.isnan(out).all()  # every sequence holds one bad label
    sgrad = cpp.sequence_logprobs_bwd(logits.view(3, 2, 300), labels.view(3, 2), slse, zeros[:3] + 1, 1.0,
                                      IGNORE, False, torch.zeros(3, 2, 300, dtype=dtype))
    assert torch.isnan(sgrad.view(6, 300)[1:5]).all() and torch.isfinite(sgrad.view(6, 300)[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_shift_slice_is_read_in_place_3d(dtype):
    """logits[:, :-1] ([R, C, V], two row strides) straight into the token and policy launchers:
    bitwise the contiguous results, fwd and bwd, out of place and in place, and no copy."""
    full = make_logits((3, 7, 1000), dtype, seed=2)
    view = full[:, :-1]
    assert not view.is_contiguous()
    flat = view.reshape(18, 1000)  # a copy: the oracle
    labels = make_labels((18,), 1000, seed=3)
    g = torch.Generator().manual_seed(5)
    gl, ge = torch.randn(18, generator=g), torch.randn(18, generator=g)
    a, b = cpp.token_logprobs_fwd(view, labels, 0.7, IGNORE), cpp.token_logprobs_fwd(flat, labels, 0.7, IGNORE)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    expected = cpp.token_logprobs_bwd(flat, labels, b[2], b[1], gl, ge, 0.7, IGNORE, torch.empty_like(flat))
    out = torch.empty_like(view)  # contiguous [3, 6, V]: strides differ from the view's
    assert cpp.token_logprobs_bwd(view, labels, a[2], a[1], gl, ge, 0.7, IGNORE, out) is out
    assert torch.equal(out.reshape(18, 1000), expected)
    buf = full.clone()
    in_place = buf[:, :-1]
    grad = cpp.token_logprobs_bwd(in_place, labels, a[2], a[1], gl, ge, 0.7, IGNORE, in_place)
    assert grad.data_ptr() == buf.data_ptr() and torch.equal(grad.reshape(18, 1000), expected)
    assert torch.equal(buf[:, -1], full[:, -1])  # the dropped position is untouched
    old, adv, w = torch.full((18,), -6.0), torch.linspace(-1, 1, 18), torch.rand(18, generator=g)
    args = _policy_args(entropy_coef=0.01, temperature=0.7)
    ref_grad = torch.empty_like(flat)
    ref = cpp.policy_loss_fwd(flat, labels, old, adv, None, w, args, ref_grad)
    buf = full.clone()
    ours = cpp.policy_loss_fwd(buf[:, :-1], labels, old, adv, None, w, args, buf[:, :-1])
    for x, y in zip(ours, ref):
        assert torch.equal(x, y)
    assert torch.equal(buf[:, :-1].reshape(18, 1000), ref_grad) and torch.equal(buf[:, -1], full[:, -1])
    with pytest.raises(ValueError, match="shape"):
        cpp.token_logprobs_bwd(view, labels, a[2], a[1], gl, ge, 0.7, IGNORE, torch.empty_like(flat))


# ------------------------------------------------- issue 8, defect 12: the CPU speed collapse
@pytest.mark.parametrize("task_bytes", ["0", "1", "300000"])  # static split, one row per task, a few rows
def test_task_split_never_changes_bits(task_bytes, monkeypatch):
    """The dynamic schedule (FASTPO_CPU_TASK_BYTES) decides which thread runs a row, never its bits."""
    logits, labels, gl, ge = _case(64, 4099, torch.bfloat16)
    expected = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    g_expected = cpp.token_logprobs_bwd(logits, labels, expected[2], expected[1], gl, ge, 0.7, IGNORE,
                                        torch.empty_like(logits))
    monkeypatch.setenv("FASTPO_CPU_TASK_BYTES", task_bytes)
    got = cpp.token_logprobs_fwd(logits, labels, 0.7, IGNORE)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    g = cpp.token_logprobs_bwd(logits, labels, got[2], got[1], gl, ge, 0.7, IGNORE, torch.empty_like(logits))
    assert torch.equal(g, g_expected)


class _Madvise:
    def __init__(self):
        self.calls = []

    def madvise(self, start, length, advice):
        self.calls.append((start, length, advice))


def test_huge_pages_are_advised_only_when_no_compaction_is_needed(monkeypatch):
    """MADV_HUGEPAGE under THP defrag=madvise compacts memory synchronously on a fault that finds
    no free 2 MiB block: the advice is given only while free 2 MiB blocks cover the buffer."""
    libc = _Madvise()
    monkeypatch.setattr(cpp, "_libc", lambda: libc)
    logits = torch.empty(64, 1 << 17)  # 32 MiB
    grad = torch.empty_like(logits)
    monkeypatch.setattr(cpp, "_free_huge_blocks_bytes", lambda: 0)
    cpp._advise_huge_pages(grad, logits)
    assert libc.calls == []
    monkeypatch.setattr(cpp, "_free_huge_blocks_bytes", lambda: 1 << 40)
    cpp._advise_huge_pages(grad, logits)
    ((start, length, advice),) = libc.calls
    assert advice == 14 and start % (1 << 21) == 0 and length % (1 << 21) == 0
    assert grad.data_ptr() <= start and start + length <= grad.data_ptr() + grad.numel() * 4
    # a strided gradient: the advised range is the span it covers, not numel() bytes from its start
    libc.calls.clear()
    wide = torch.empty(2, 40, 1 << 17)  # 40 MiB, viewed as [2, 39, V]
    cpp._advise_huge_pages(wide[:, 1:], logits)
    ((start, length, _),) = libc.calls
    assert start + length <= wide.data_ptr() + wide.numel() * 4
    libc.calls.clear()
    cpp._advise_huge_pages(logits, logits)  # in place: nothing to fault
    assert libc.calls == []


def test_bench_reports_median_and_p90_over_ten_runs():
    from fastpo.benchmarks._measure import time_stats

    calls = []
    st = time_stats(lambda: calls.append(1), torch.device("cpu"), warmup=1, reps=3)
    assert st.runs == 10 and len(calls) == 11
    assert st.min_ms <= st.median_ms <= st.p90_ms
