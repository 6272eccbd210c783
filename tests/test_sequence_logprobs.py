"""sequence_logprobs on every available backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from fastpo.functional.sequence_logprobs import sequence_logprobs
from fastpo.reference.sequence_logprobs import sequence_logprobs_ref
from conftest import backend_params, make_labels, make_logits, rel_err

BACKENDS = backend_params("sequence_logprobs")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    pytest.param((3, 4, 17), id="odd-V17"),  # V far below one block, not a power of two
    pytest.param((2, 3, 4099), id="multi-block-V4099"),  # 4096-wide blocks: two passes, ragged tail
    pytest.param((3, 1, 31), id="T1"),  # a single token per sequence
    pytest.param((2, 9, 130), id="T9"),  # T not a power of two (reduction tree padding)
]


def _reference(logits, labels, **kw):
    x = logits.detach().double().requires_grad_()
    return x, sequence_logprobs_ref(x, labels, **kw)


def _run(logits, labels, backend, **kw):
    x = logits.detach().clone().requires_grad_()
    return x, sequence_logprobs(x, labels, backend=backend, **kw)


def _grad(out, x, upstream):
    (grad,) = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), x)
    return grad


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_match_float64(device, backend, dtype, shape, average, temperature):
    logits = make_logits(shape, dtype, device)
    labels = make_labels(shape[:-1], shape[-1], device, ignore_frac=0.3)
    x, out = _run(logits, labels, backend, average=average, temperature=temperature)
    xr, out_r = _reference(logits, labels, average=average, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert rel_err(out, out_r) <= 1e-5
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    grad, grad_r = _grad(out, x, upstream), _grad(out_r, xr, upstream)
    assert grad.dtype == dtype
    assert rel_err(grad, grad_r) <= (1e-5 if dtype == torch.float32 else 1.5e-2)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_with_every_token_ignored(device, backend, dtype):
    """An empty completion gives 0 for the sum and 0 (not NaN) for the mean, and no gradient."""
    logits = make_logits((3, 5, 40), dtype, device)
    labels = make_labels((3, 5), 40, device, ignore_frac=0.0)
    labels[1] = -100
    logits[1] = float("nan")  # an ignored token is never read: garbage there cannot leak
    for average in (False, True):
        x, out = _run(logits, labels, backend, average=average)
        grad = _grad(out, x, torch.ones(3, device=device))
        assert out[1].item() == 0.0 and torch.isfinite(out).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ignored_tokens_exact_zero_gradient(device, backend):
    logits = make_logits((2, 6, 50), torch.float32, device)
    labels = make_labels((2, 6), 50, device, ignore_frac=0.5)
    x, out = _run(logits, labels, backend, average=True)
    grad = _grad(out, x, torch.tensor([1.5, -2.0], device=device))
    ignored = labels == -100
    assert not grad[ignored].any() and grad[~ignored].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_invariant_and_deterministic(device, backend, dtype):
    """Bitwise: the same value and gradient for a sequence alone, in a batch, padded, and rerun."""
    logits = make_logits((5, 7, 1031), dtype, device)
    labels = make_labels((5, 7), 1031, device)
    upstream = torch.linspace(-1, 1, 5, device=device)
    x, out = _run(logits, labels, backend, temperature=0.9)
    grad = _grad(out, x, upstream)
    x2, out2 = _run(logits, labels, backend, temperature=0.9)
    assert torch.equal(out, out2) and torch.equal(grad, _grad(out2, x2, upstream))
    for i in (0, 2, 4):
        xi, oi = _run(logits[i : i + 1], labels[i : i + 1], backend, temperature=0.9)
        assert torch.equal(oi[0], out[i]) and torch.equal(_grad(oi, xi, upstream[i : i + 1])[0], grad[i])
    # trailing ignored padding (a longer T) changes nothing either
    pad_logits = torch.cat([logits, make_logits((5, 6, 1031), dtype, device, seed=3)], dim=1)
    pad_labels = torch.cat([labels, torch.full((5, 6), -100, device=device)], dim=1)
    _, out_pad = _run(pad_logits, pad_labels, backend, temperature=0.9)
    assert torch.equal(out_pad, out)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(device, backend, dtype):
    logits = make_logits((3, 4, 600), dtype, device)
    labels = make_labels((3, 4), 600, device)
    upstream = torch.tensor([0.5, -1.0, 2.0], device=device)
    x, out = _run(logits, labels, backend, average=True)
    expected = _grad(out, x, upstream)
    buf = logits.detach().clone().requires_grad_()
    out2 = sequence_logprobs(buf, labels, average=True, inplace_backward=True, backend=backend)
    grad = _grad(out2, buf, upstream)
    assert grad.data_ptr() == buf.data_ptr()  # written over the logits: no second B x T x V buffer
    assert torch.equal(out2, out) and torch.equal(grad, expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_shifted_slice_read_in_place(device, backend, inplace):
    """``logits[:, :-1]`` (a causal LM's shift) is read through its strides, never copied."""
    full = make_logits((3, 6, 77), torch.float32, device).requires_grad_()
    labels = make_labels((3, 5), 77, device)
    out = sequence_logprobs(full[:, :-1], labels, inplace_backward=inplace, backend=backend)
    xr, out_r = _reference(full[:, :-1], labels)
    assert rel_err(out, out_r) <= 1e-5
    upstream = torch.tensor([1.0, -0.5, 0.25], device=device)
    (grad,) = torch.autograd.grad((out * upstream).sum(), full)
    grad_r = _grad(out_r, xr, upstream)
    assert rel_err(grad[:, :-1], grad_r) <= 1e-5 and not grad[:, -1].any()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_kernels(device, backend):
    """float64 logits accumulate in float64, so every backend's analytic gradient can be gradchecked."""
    logits = make_logits((2, 3, 13), torch.float64, device).requires_grad_()
    labels = torch.tensor([[5, -100, 12], [0, 3, -100]], device=device)
    for average in (False, True):
        fn = lambda z: sequence_logprobs(z, labels, average=average, temperature=0.8, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_shapes(device, backend):
    x = torch.randn(2, 0, 7, device=device, requires_grad=True)
    out = sequence_logprobs(x, torch.zeros(2, 0, dtype=torch.long, device=device), backend=backend)
    assert out.tolist() == [0, 0] and _grad(out, x, torch.ones(2, device=device)).shape == (2, 0, 7)
    empty = sequence_logprobs(torch.randn(0, 3, 7, device=device), torch.zeros(0, 3, dtype=torch.long, device=device), backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])), r"\[B, T, V\]"),
        (lambda: (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)), "labels shape"),
        (lambda: (torch.randn(2, 3, 5), torch.full((2, 3), 5)), r"labels must lie in \[0, 5\)"),
        (lambda: (torch.randn(2, 3, 5), torch.zeros(2, 3)), "labels must be an integer"),
    ],
)
def test_bad_inputs(make, match):
    logits, labels = make()
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(logits, labels)


def test_bad_temperature_and_backend():
    logits, labels = torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        sequence_logprobs(logits, labels, backend="tpu")


def test_custom_ops_opcheck():
    """Fake kernels agree with the real ones (schema, shapes, dtypes, aliasing)."""
    from fastpo.ops.sequence_logprobs import sequence_logprobs_bwd_op, sequence_logprobs_fwd_op

    logits, labels = torch.randn(2, 3, 40), torch.tensor([[1, -100, 39], [0, 2, 3]])
    torch.library.opcheck(sequence_logprobs_fwd_op, (logits, labels, 1.0, -100, True, "torch"))
    _, lse = sequence_logprobs_fwd_op(logits, labels, 1.0, -100, True, "torch")
    torch.library.opcheck(sequence_logprobs_bwd_op, (logits, labels, lse, torch.randn(2), 1.0, -100, True, "torch"))


def test_torch_compile_traces_custom_ops():
    def loss(z, y):
        return sequence_logprobs(z, y, average=True, backend="torch").sum()

    logits = torch.randn(2, 4, 64, requires_grad=True)
    labels = torch.randint(0, 64, (2, 4))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    (g_c,) = torch.autograd.grad(compiled(logits, labels), logits)
    (g_e,) = torch.autograd.grad(loss(logits, labels), logits)
    assert torch.allclose(g_c, g_e)
