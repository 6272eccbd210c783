"""token_logprobs on every available backend against the float64 reference."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastpo
from fastpo.reference import token_logprobs_ref
from conftest import backend_params, make_labels, make_logits, rel_err

BACKENDS = backend_params("token_logprobs")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    pytest.param((5, 17), id="odd-V17"),  # V far below one block, not a power of two
    pytest.param((4, 1000), id="V1000"),  # one partial block
    pytest.param((3, 4099), id="multi-block-V4099"),  # 4096-wide blocks: two passes, ragged tail
    pytest.param((2, 3, 257), id="3d-leading"),  # any leading shape [..., V]
    pytest.param((1, 31), id="T1"),  # a single token
]


def _reference(logits, labels, temperature=1.0):
    x = logits.detach().double().requires_grad_()
    logp, ent = token_logprobs_ref(x, labels, temperature=temperature)
    return x, logp, ent


def _run(logits, labels, backend, **kw):
    x = logits.detach().clone().requires_grad_()
    logp, ent = fastpo.token_logprobs(x, labels, return_entropy=True, backend=backend, **kw)
    return x, logp, ent


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_match_float64(device, backend, dtype, shape, temperature):
    logits = make_logits(shape, dtype, device)
    labels = make_labels(shape[:-1], shape[-1], device)
    x, logp, ent = _run(logits, labels, backend, temperature=temperature)
    xr, logp_r, ent_r = _reference(logits, labels, temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == labels.shape and ent.shape == labels.shape
    # forward: fp32 accumulation of the same (upcast) inputs is within 1e-5 of float64
    assert rel_err(logp, logp_r) <= 1e-5
    assert rel_err(ent, ent_r) <= 1e-5
    # backward with random upstream gradients for both outputs
    g = torch.Generator().manual_seed(7)
    g_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64).to(device)
    g_h = torch.randn(labels.shape, generator=g, dtype=torch.float64).to(device)
    (grad,) = torch.autograd.grad((logp * g_lp.float()).sum() + (ent * g_h.float()).sum(), x)
    (grad_r,) = torch.autograd.grad((logp_r * g_lp).sum() + (ent_r * g_h).sum(), xr)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert rel_err(grad, grad_r) <= tol


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradient_beats_torch_in_same_dtype(device, backend, dtype):
    """Kernel error vs float64 is at most 2x that of PyTorch itself run in that dtype."""
    logits = make_logits((6, 1000), dtype, device)
    labels = make_labels((6,), 1000, device)
    x, logp, _ = _run(logits, labels, backend)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    xr, logp_r, _ = _reference(logits, labels)
    (grad_r,) = torch.autograd.grad(logp_r.sum(), xr)
    xt = logits.detach().clone().requires_grad_()
    lp_t = torch.log_softmax(xt, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    (grad_t,) = torch.autograd.grad((lp_t * (labels != -100)).sum(), xt)
    assert rel_err(grad, grad_r) <= 2 * rel_err(grad_t, grad_r) + 1e-3


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_only_one_output_used(device, backend):
    """Upstream gradient of one output absent (None): entropy-only and logp-only paths."""
    logits = make_logits((4, 300), torch.float32, device)
    labels = make_labels((4,), 300, device)
    for pick in (0, 1):
        xr, *outs_r = _reference(logits, labels)
        x, *outs = _run(logits, labels, backend)
        (grad,) = torch.autograd.grad(outs[pick].sum(), x)
        (grad_r,) = torch.autograd.grad(outs_r[pick].sum(), xr)
        assert rel_err(grad, grad_r) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignored_positions_exact_zero(device, backend, dtype):
    logits = make_logits((6, 129), dtype, device)
    labels = make_labels((6,), 129, device, ignore_frac=0.0)
    labels[1] = labels[4] = -100
    logits[4] = float("nan")  # an ignored row is never read: garbage there cannot leak
    x, logp, ent = _run(logits, labels, backend)
    (grad,) = torch.autograd.grad((logp * 3).sum() + ent.sum(), x)
    for r in (1, 4):
        assert logp[r].item() == 0.0 and ent[r].item() == 0.0
        assert torch.equal(grad[r], torch.zeros_like(grad[r]))
    assert torch.isfinite(grad[[0, 2, 3, 5]]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_positions_ignored(device, backend):
    logits = make_logits((3, 50), torch.float32, device)
    labels = torch.full((3,), -1, device=device)
    x, logp, ent = _run(logits, labels, backend, ignore_index=-1)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert not logp.any() and not ent.any() and not grad.any()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(device, backend, dtype):
    logits = make_logits((5, 1000), dtype, device)
    labels = make_labels((5,), 1000, device)
    x, logp, ent = _run(logits, labels, backend)
    (expected,) = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), x)
    buf = logits.detach().clone().requires_grad_()
    logp2, ent2 = fastpo.token_logprobs(buf, labels, return_entropy=True, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad(logp2.sum() + 0.5 * ent2.sum(), buf)
    assert grad.data_ptr() == buf.data_ptr()  # written over the logits: no second N x V buffer
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_invariant_and_deterministic(device, backend, dtype):
    logits = make_logits((9, 1031), dtype, device)
    labels = make_labels((9,), 1031, device, ignore_frac=0.0)
    x, logp, ent = _run(logits, labels, backend, temperature=0.9)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    x2, logp2, ent2 = _run(logits, labels, backend, temperature=0.9)
    (grad2,) = torch.autograd.grad(logp2.sum() + ent2.sum(), x2)
    assert torch.equal(logp, logp2) and torch.equal(ent, ent2) and torch.equal(grad, grad2)
    for i in (0, 4, 8):
        xi, lpi, hi = _run(logits[i : i + 1], labels[i : i + 1], backend, temperature=0.9)
        (gi,) = torch.autograd.grad(lpi.sum() + hi.sum(), xi)
        assert torch.equal(lpi[0], logp[i]) and torch.equal(hi[0], ent[i]) and torch.equal(gi[0], grad[i])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_rows(device, backend):
    """Rows with a stride larger than V (a slice of a wider buffer) are read in place."""
    wide = make_logits((4, 600), torch.float32, device)
    logits = wide[:, :577]
    labels = make_labels((4,), 577, device)
    x, logp, ent = _run(logits, labels, backend)
    _, logp_r, ent_r = _reference(logits, labels)
    assert rel_err(logp, logp_r) <= 1e-5 and rel_err(ent, ent_r) <= 1e-5


def test_gradcheck_reference():
    logits = make_logits((3, 11), torch.float64).requires_grad_()
    labels = torch.tensor([2, -100, 10])
    fn = lambda z: token_logprobs_ref(z, labels, temperature=0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_kernels(device, backend):
    """float64 logits accumulate in float64, so every backend's analytic gradient can be gradchecked."""
    logits = make_logits((3, 37), torch.float64, device).requires_grad_()
    labels = torch.tensor([5, -100, 36], device=device)
    fn = lambda z: fastpo.token_logprobs(z, labels, return_entropy=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(2, 5), torch.tensor([0, 5])), r"labels must lie in \[0, 5\)"),
        (lambda: (torch.randn(2, 5), torch.tensor([-3, 1])), r"found -3"),
        (lambda: (torch.randn(2, 5), torch.tensor([0, 1, 2])), "labels shape"),
        (lambda: (torch.randint(0, 3, (2, 5)), torch.tensor([0, 1])), "logits must be float32"),
        (lambda: (torch.randn(2, 5), torch.tensor([0.0, 1.0])), "labels must be an integer"),
        (lambda: (torch.randn(2, 0), torch.zeros(2, dtype=torch.long)), "at least 1"),
    ],
)
def test_bad_inputs(make, match):
    logits, labels = make()
    with pytest.raises(ValueError, match=match):
        fastpo.token_logprobs(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        fastpo.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), temperature=temperature)


def test_backend_errors():
    logits, labels = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown backend"):
        fastpo.token_logprobs(logits, labels, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            fastpo.token_logprobs(logits, labels, backend="cuda")
    with pytest.raises((RuntimeError, TypeError), match="process_group"):  # not a live group
        fastpo.token_logprobs(logits, labels, process_group=object())


def test_empty_batch():
    out = fastpo.token_logprobs(torch.randn(0, 7), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


def test_custom_ops_opcheck():
    """Fake kernels agree with the real ones (schema, shapes, dtypes, aliasing)."""
    from fastpo.ops.token_logprobs import token_logprobs_bwd_op, token_logprobs_fwd_op

    logits, labels = torch.randn(3, 40), torch.tensor([1, -100, 39])
    torch.library.opcheck(token_logprobs_fwd_op, (logits, labels, 1.0, -100, "torch"))
    logp, ent, lse = token_logprobs_fwd_op(logits, labels, 1.0, -100, "torch")
    args = (logits, labels, lse, ent, torch.randn(3), None, 1.0, -100, "torch")
    torch.library.opcheck(token_logprobs_bwd_op, args)


def test_torch_compile_traces_custom_ops():
    def loss(z, y):
        lp, h = fastpo.token_logprobs(z, y, return_entropy=True, backend="torch")
        return lp.sum() + 0.1 * h.sum()

    logits = torch.randn(4, 64, requires_grad=True)
    labels = torch.randint(0, 64, (4,))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    (g_c,) = torch.autograd.grad(compiled(logits, labels), logits)
    (g_e,) = torch.autograd.grad(loss(logits, labels), logits)
    assert torch.allclose(g_c, g_e)


def test_import_is_gpu_free():
    code = (
        "import sys, torch, fastpo\n"
        "assert 'triton' not in sys.modules, 'fastpo imported triton'\n"
        "assert not torch.cuda.is_initialized(), 'fastpo initialised CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
