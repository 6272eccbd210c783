"""Fused policy_loss from logits against the composed path (token_logprobs + policy_loss_from_logprobs).

Every backend that runs token_logprobs here runs the fused op: "triton" and "cpu" take their
fused kernel for ppo / cispo and the two-phase path for gspo, "torch" the two-phase path.
Shapes stay small because the Triton backend runs under the interpreter on CPU: B=2, T=4,
V=300 (one partial block) for the config sweep; V=17, V=4099 (two blocks, ragged tail) and
T=1 in the shape test.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastpo
from fastpo import PolicyLoss, PolicyLossConfig, presets
from fastpo.reference import token_logprobs_ref
from conftest import backend_params, make_labels, make_logits, rel_err

BACKENDS = backend_params("token_logprobs")
C = PolicyLossConfig
B, T, V = 2, 4, 300


# ----------------------------------------------------------------------------- helpers
def make_batch(dtype=torch.float32, *, shape=(B, T, V), temperature=1.0, seed=0, spread=0.6,
               per_token_adv=False, device="cpu"):
    """Logits plus old / ref log-probs centred on the true log-probs (ratios straddle the
    clip range: spread 0.6 gives r in ~[0.3, 3]), a mask with zeros and ignore_index labels."""
    b, t, v = shape
    logits = make_logits(shape, dtype, scale=2.0, seed=seed)
    labels = make_labels((b, t), v, ignore_frac=0.15, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.rand(b, t, generator=g) > 0.15
    mask[0, 0] = True
    labels[0, 0] = labels[0, 0].clamp_min(0)  # at least one live token
    with torch.no_grad():
        lp, _ = token_logprobs_ref(logits.double(), labels, temperature=temperature)
    old = (lp + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    ref = (lp + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=g, dtype=torch.float64).abs()
    adv[1::2] *= -1  # both signs, so both clip sides (and the dual clip) are exercised
    adv = adv.float()
    to = lambda x: x.to(device)  # noqa: E731
    return dict(logits=to(logits), labels=to(labels), old=to(old), adv=to(adv), mask=to(mask), ref=to(ref))


def call(batch, logits, **kw):
    """fastpo.policy_loss on ``logits`` with the batch's labels, old log-probs, advantages, mask."""
    return fastpo.policy_loss(logits, batch["labels"], batch["old"], batch["adv"], mask=batch["mask"], **kw)


def run_fused(batch, config, backend, *, upstream=1.7, counts=None, inplace=False):
    x = batch["logits"].detach().clone().requires_grad_()
    out = call(batch, x, ref_logprobs=batch["ref"], config=config, backend=backend, inplace_backward=inplace,
               **(counts or {}))
    (grad,) = torch.autograd.grad(out.loss * upstream if upstream != 1.0 else out.loss, x)
    return out, grad, x


def run_composed(batch, config, backend, *, upstream=1.7, counts=None, ignore_index=-100):
    """token_logprobs on ``backend`` (or the float64 reference for backend=None) + from-logprobs."""
    x = batch["logits"].detach().clone()
    labels = batch["labels"]
    if backend is None:
        x = x.double().requires_grad_()
        lp, ent = token_logprobs_ref(x, labels, temperature=config.temperature, ignore_index=ignore_index)
    else:
        x.requires_grad_()
        lp, ent = fastpo.token_logprobs(x, labels, temperature=config.temperature, return_entropy=True,
                                        ignore_index=ignore_index, backend=backend)
    mask = batch["mask"] & (labels != ignore_index)
    out = fastpo.policy_loss_from_logprobs(
        lp, batch["old"], batch["adv"], mask, ref_logprobs=batch["ref"], entropy=ent, config=config,
        **(counts or {}),
    )
    (grad,) = torch.autograd.grad(out.loss * upstream, x)
    return out, grad


def assert_values_close(out, expected, rtol):
    assert out.loss.shape == () and out.per_token_loss.shape == expected.per_token_loss.shape
    assert not out.per_token_loss.requires_grad  # detached on the fused path
    assert rel_err(out.loss, expected.loss) <= rtol
    assert rel_err(out.per_token_loss, expected.per_token_loss) <= rtol
    assert set(out.metrics) == set(expected.metrics)
    for key, value in out.metrics.items():
        assert value.dtype == torch.float32 and value.shape == ()
        torch.testing.assert_close(value.double(), expected.metrics[key].double(), rtol=rtol, atol=1e-6,
                                   msg=lambda m, k=key: f"metric {k}: {m}")


# ----------------------------------------------------------------------------- every config field, fp32
# (id, config, extra): extra may set per_token_adv / counts. Hyper-parameters are runtime values.
CASES = [
    ("ppo", C(), {}),
    ("clip-higher", C(clip_low=0.2, clip_high=0.28), {}),
    ("clip-inf-high", C(clip_low=0.2, clip_high=math.inf), {}),
    ("dual-clip", C(dual_clip=1.5), {}),
    ("ratio-cap", C(clip_high=0.5, ratio_cap=1.25), {}),
    ("logratio-clamp", C(logratio_clamp=0.5), {}),
    *[(f"kl-{e}", C(kl_coef=0.25, kl_estimator=e), {})
      for e in ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")],
    ("kl-k3-clamp", C(kl_coef=0.25, kl_estimator="k3", kl_clamp=0.125), {}),
    ("kl-k1-clamp", C(kl_coef=0.25, kl_estimator="k1", kl_clamp=0.125), {}),
    ("kl-k3+-clamp", C(kl_coef=0.25, kl_estimator="k3+", kl_clamp=0.125), {}),
    ("entropy", C(entropy_coef=0.0625), {}),
    ("entropy-negative", C(entropy_coef=-0.03), {}),
    ("temperature-0.7", C(temperature=0.7), {}),
    ("temperature-1.5-entropy", C(temperature=1.5, entropy_coef=0.01), {}),
    ("agg-seq-mean-token-mean", C(agg="seq-mean-token-mean"), {}),
    ("agg-seq-mean-token-sum", C(agg="seq-mean-token-sum"), {}),
    ("agg-seq-mean-token-sum-norm", C(agg="seq-mean-token-sum-norm"), {}),
    ("agg-sum-norm-scale", C(agg="seq-mean-token-sum-norm", agg_scale=16.0), {}),
    ("num-tokens-number", C(), {"counts": {"num_tokens": 11.0}}),
    ("num-tokens-tensor", C(entropy_coef=0.01), {"counts": {"num_tokens": torch.tensor(13.0)}}),
    ("num-sequences-number", C(agg="seq-mean-token-mean"), {"counts": {"num_sequences": 5}}),
    ("num-sequences-tensor", C(agg="seq-mean-token-sum"), {"counts": {"num_sequences": torch.tensor(3)}}),
    ("num-sequences-norm", C(agg="seq-mean-token-sum-norm"), {"counts": {"num_sequences": torch.tensor(4.0)}}),
    ("adv-per-token", C(), {"per_token_adv": True}),
    ("gspo", C(variant="gspo"), {}),
    ("gspo-paper-clip", C(variant="gspo", clip_low=3e-4, clip_high=4e-4), {}),
    ("gspo-all", C(variant="gspo", dual_clip=1.5, ratio_cap=1.25, kl_coef=0.25, entropy_coef=0.0625,
                   agg="seq-mean-token-mean"), {}),
    ("gspo-adv-per-token", C(variant="gspo"), {"per_token_adv": True}),
    ("cispo", C(variant="cispo"), {}),
    ("cispo-trl", C(variant="cispo", clip_low=1.0, clip_high=4.0), {}),
    ("cispo-all", C(variant="cispo", kl_coef=0.25, kl_estimator="k2", entropy_coef=0.0625,
                    agg="seq-mean-token-sum", temperature=0.9), {"per_token_adv": True}),
    ("everything", C(clip_high=0.28, dual_clip=2.0, logratio_clamp=1.0, kl_coef=0.125, kl_estimator="k3+",
                     kl_clamp=1.0, entropy_coef=0.01, temperature=0.9, agg="seq-mean-token-mean"),
     {"counts": {"num_sequences": 3}}),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,config,extra", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_composed(device, backend, name, config, extra):
    batch = make_batch(temperature=config.temperature, per_token_adv=extra.get("per_token_adv", False),
                       device=device)
    counts = extra.get("counts")
    out, grad, _ = run_fused(batch, config, backend, counts=counts)
    expected, grad_c = run_composed(batch, config, backend, counts=counts)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_values_close(out, expected, 1e-5)
    assert rel_err(grad, grad_c) <= 1e-5


# ----------------------------------------------------------------------------- low precision, float64
LOW_PRECISION_CASES = [
    ("grpo-k3-clip-higher", C(clip_high=0.28, kl_coef=0.04, kl_estimator="k3")),
    ("gspo", C(variant="gspo")),
    ("cispo-entropy", C(variant="cispo", clip_low=1.0, clip_high=4.0, entropy_coef=0.01)),
    ("temperature-entropy", C(temperature=0.7, entropy_coef=0.0625, agg="seq-mean-token-mean")),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,config", LOW_PRECISION_CASES, ids=[c[0] for c in LOW_PRECISION_CASES])
@pytest.mark.parametrize("upstream", [1.0, 1.7])
def test_low_precision_vs_float64(device, backend, dtype, name, config, upstream):
    """Values (fp32 accumulation of the upcast logits) within 1e-5 of float64; the gradient,
    rounded to the logits' dtype, within 2x the error of the composed path in that dtype.

    The fused gradient is written in the forward for an upstream of 1 and scaled by the
    backward, so an upstream that is not a power of two rounds it twice: one more ulp allowed
    then (2^-8 bf16, 2^-11 fp16)."""
    batch = make_batch(dtype, temperature=config.temperature, device=device)
    out, grad, _ = run_fused(batch, config, backend, upstream=upstream)
    ref, grad_ref = run_composed(batch, config, None, upstream=upstream)
    _, grad_c = run_composed(batch, config, backend, upstream=upstream)
    assert grad.dtype == dtype
    assert_values_close(out, ref, 1e-5)
    extra = 1e-3 if upstream == 1.0 else torch.finfo(dtype).eps
    assert rel_err(grad, grad_ref) <= 2 * rel_err(grad_c, grad_ref) + extra


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_upstream_scale_not_rounded_to_low_precision(device, backend, dtype):
    """Regression: the backward multiplied by ``grad_loss.to(bf16)`` (1/3 -> 0.333984, a 0.2%
    bias on every element). The scale must be applied at fp32 precision: unbiased."""
    batch = make_batch(dtype, device=device)
    config = C(variant="cispo", entropy_coef=0.0625)
    _, grad1, _ = run_fused(batch, config, backend, upstream=1.0)
    _, grad3, _ = run_fused(batch, config, backend, upstream=1 / 3)
    g1, g3 = grad1.double(), grad3.double()
    live = g1.abs() > 4 * torch.finfo(dtype).tiny  # normal numbers only (fp16 subnormals are coarse)
    scale = (g3[live] / g1[live]).mean()  # rounding errors average out (hundreds of elements)
    assert abs(scale.item() * 3 - 1) < 1e-4


# float64: every hyper-parameter reaches the kernels as float64 (an untyped Python float would
# bind as fp32 in Triton: "ppo-not-fp32-exact" uses values fp32 cannot represent to prove it).
FLOAT64_CASES = [
    ("ppo-not-fp32-exact", C(clip_low=0.2, clip_high=0.28, dual_clip=3.1, kl_coef=0.04, kl_estimator="k3",
                             kl_clamp=0.3, entropy_coef=0.01, temperature=0.7, logratio_clamp=0.3)),
    ("ppo-all", C(clip_low=0.25, clip_high=0.375, dual_clip=1.5, kl_coef=0.25, kl_estimator="k3",
                  kl_clamp=0.5, entropy_coef=0.0625, temperature=0.5)),
    ("ppo-ratio-cap-k2+", C(ratio_cap=1.25, logratio_clamp=0.5, kl_coef=0.125, kl_estimator="k2+",
                            agg="seq-mean-token-sum-norm")),
    ("gspo", C(variant="gspo", clip_low=0.25, clip_high=0.25, entropy_coef=0.0625, agg="seq-mean-token-mean")),
    ("cispo", C(variant="cispo", clip_low=0.5, clip_high=0.25, kl_coef=0.25, kl_estimator="abs",
                entropy_coef=0.0625, temperature=2.0, agg="seq-mean-token-sum")),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,config", FLOAT64_CASES, ids=[c[0] for c in FLOAT64_CASES])
def test_float64_matches_reference(device, backend, name, config):
    batch = make_batch(torch.float64, temperature=config.temperature, device=device)
    out, grad, _ = run_fused(batch, config, backend)
    ref, grad_ref = run_composed(batch, config, None)
    assert out.loss.dtype == torch.float64 and out.per_token_loss.dtype == torch.float64
    assert grad.dtype == torch.float64
    assert_values_close(out, ref, 1e-12)
    assert rel_err(grad, grad_ref) <= 1e-12


# CISPO's gradient drops d clip(r) / d logp (stop-gradient), so it is the derivative of its value
# only where every ratio is clipped: a clip range of 2^-10 makes that so. GSPO's token form has
# the derivative of its value under seq-mean-token-mean.
GRADCHECK_CASES = [
    FLOAT64_CASES[0],
    FLOAT64_CASES[2],
    ("cispo-clipped", C(variant="cispo", clip_low=2**-10, clip_high=2**-10, kl_coef=0.25, kl_estimator="k2",
                        entropy_coef=0.0625, temperature=2.0)),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,config", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(device, backend, name, config):
    batch = make_batch(torch.float64, shape=(2, 2, 5), temperature=config.temperature, device=device)
    batch["labels"][1, 1] = -100
    batch["mask"][0, 1] = False
    logits = batch["logits"].clone().requires_grad_()

    def fn(z):
        return call(batch, z, ref_logprobs=batch["ref"], config=config, backend=backend).loss

    assert torch.autograd.gradcheck(fn, (logits,), atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((3, 2, 17), id="odd-V17"),  # V far below one block
        pytest.param((2, 2, 4099), id="multi-block-V4099"),  # two 4096-wide blocks, ragged tail
        pytest.param((3, 1, 300), id="T1"),  # one token per sequence
    ],
)
@pytest.mark.parametrize("config", [C(kl_coef=0.25, entropy_coef=0.0625), C(variant="gspo")], ids=["ppo", "gspo"])
def test_shapes(device, backend, shape, config):
    batch = make_batch(shape=shape, device=device)
    out, grad, _ = run_fused(batch, config, backend)
    expected, grad_c = run_composed(batch, config, backend)
    assert_values_close(out, expected, 1e-5)
    assert rel_err(grad, grad_c) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_shifted_slice_of_logits(device, backend, inplace):
    """The usual call: logits[:, :-1] of the model output (non-contiguous); the gradient of the
    last position is zero."""
    leaf = make_logits((B, T + 1, V), torch.float32, device, scale=2.0).requires_grad_()
    full = leaf.clone() if inplace else leaf  # the in-place path needs a non-leaf buffer
    batch = make_batch(device=device)
    config = C(entropy_coef=0.0625)
    out = call(batch, full[:, :-1], config=config, backend=backend, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(out.loss * 1.7, leaf)
    batch["logits"] = leaf.detach()[:, :-1]
    batch["ref"] = None
    expected, grad_c = run_composed(batch, config, backend)
    assert_values_close(out, expected, 1e-5)
    assert rel_err(grad[:, :-1], grad_c) <= 1e-5
    assert not grad[:, -1].any()


# ----------------------------------------------------------------------------- masking, extremes
VARIANTS = [C(kl_coef=0.25), C(variant="gspo", kl_coef=0.25), C(variant="cispo", entropy_coef=0.0625, kl_coef=0.25)]
VARIANT_IDS = ["ppo", "gspo", "cispo"]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("config", VARIANTS, ids=VARIANT_IDS)
def test_masked_positions_exact_zero_even_nan(device, backend, config):
    batch = make_batch(device=device)
    labels, mask = batch["labels"], batch["mask"]
    labels[0, 1], mask[0, 1] = -100, True  # ignored by label
    labels[1, 2], mask[1, 2] = 5, False  # ignored by mask
    dead = ~mask | (labels == -100)
    logits = batch["logits"]
    logits[dead] = float("nan")  # never read, so garbage there cannot leak
    batch["old"][dead] = float("nan")
    batch["ref"][dead] = float("inf")
    out, grad, _ = run_fused(batch, config, backend)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all()
    assert not out.per_token_loss[dead].any()
    assert torch.equal(grad[dead], torch.zeros_like(grad[dead]))
    assert torch.isfinite(grad[~dead]).all() and grad[~dead].abs().sum() > 0
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_all_masked_sequence(device, backend, agg):
    """A fully masked sequence contributes 0 (and still counts in S); no NaN."""
    batch = make_batch(shape=(3, T, V), device=device)
    batch["mask"][1] = False
    batch["labels"][1, :2] = -100
    for config in (C(agg=agg, entropy_coef=0.0625), C(variant="gspo", agg=agg)):
        out, grad, _ = run_fused(batch, config, backend)
        expected, grad_c = run_composed(batch, config, backend)
        assert torch.isfinite(grad).all()
        assert not grad[1].any() and not out.per_token_loss[1].any()
        assert_values_close(out, expected, 1e-5)
        assert rel_err(grad, grad_c) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("config", VARIANTS, ids=VARIANT_IDS)
def test_all_masked_batch(device, backend, config):
    batch = make_batch(device=device)
    batch["mask"][:] = False
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        cfg = dataclasses.replace(config, agg=agg)
        out, grad, _ = run_fused(batch, cfg, backend)
        assert out.loss.item() == 0.0 and not out.per_token_loss.any()
        assert not grad.any()
        assert all(v.item() == 0.0 for v in out.metrics.values())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("config", [
    C(dual_clip=3.0, logratio_clamp=20.0, kl_coef=0.125, kl_estimator="k3", kl_clamp=10.0),
    C(variant="gspo", logratio_clamp=20.0, kl_coef=0.125, kl_estimator="k3+", kl_clamp=10.0),
    C(variant="cispo", logratio_clamp=20.0, kl_coef=0.125, kl_estimator="k1", kl_clamp=10.0, entropy_coef=0.01),
], ids=VARIANT_IDS)
def test_extreme_log_ratios_finite_with_clamps(device, backend, config):
    batch = make_batch(device=device)
    sign = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]], device=device)
    batch["old"] = batch["old"] + 300.0 * sign  # log-ratios of about -+300
    batch["ref"] = batch["ref"] - 300.0 * sign
    out, grad, _ = run_fused(batch, config, backend)
    expected, grad_c = run_composed(batch, config, backend)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert_values_close(out, expected, 1e-5)
    assert rel_err(grad, grad_c) <= 1e-5


# ----------------------------------------------------------------------------- in-place backward
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [C(entropy_coef=0.0625, kl_coef=0.25), C(variant="gspo")], ids=["ppo", "gspo"])
def test_inplace_backward_equals_out_of_place(device, backend, dtype, config):
    batch = make_batch(dtype, device=device)
    out, expected, _ = run_fused(batch, config, backend)
    out2, grad, x = run_fused(batch, config, backend, inplace=True)
    assert grad.data_ptr() == x.data_ptr()  # written over the logits: no second N x V buffer
    assert torch.equal(grad, expected)
    assert torch.equal(out2.loss, out.loss) and torch.equal(out2.per_token_loss, out.per_token_loss)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_inplace_backward_and_other_uses_of_logits(device, backend):
    """What happens when the logits are used elsewhere with inplace_backward=True:
    saved by an earlier op -> the version counter makes backward raise; read after the call
    -> they hold dL/dlogits (documented: the logits are garbage afterwards)."""
    batch = make_batch(device=device)
    config = C()
    # saved by another op of the same graph before the call: backward raises
    x = batch["logits"].clone().requires_grad_()
    other = (x * x).sum()
    out = call(batch, x, config=config, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()
    # the logits are an intermediate whose backward needs them (tanh saves its output)
    w = batch["logits"].clone().requires_grad_()
    out = call(batch, torch.tanh(w) * 5, config=config, backend=backend, inplace_backward=True)
    out.loss.backward()  # mul by a constant saves nothing: fine
    assert torch.isfinite(w.grad).all()
    w2 = batch["logits"].clone().requires_grad_()
    h = torch.tanh(w2)
    out = call(batch, h, config=config, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
    # read after the call: the buffer already holds the gradient (for an upstream of 1)
    _, expected, _ = run_fused(batch, config, backend, upstream=1.0)
    y = batch["logits"].clone().requires_grad_()
    call(batch, y, config=config, backend=backend, inplace_backward=True)
    assert torch.equal(y.detach(), expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_twice(device, backend):
    """retain_graph: a second backward accumulates correctly, also with an upstream gradient
    other than 1 (the buffer remembers the factor it already carries)."""
    batch = make_batch(device=device)
    x = batch["logits"].clone().requires_grad_()
    out = call(batch, x, backend=backend)
    out.loss.backward(retain_graph=True)
    first = x.grad.clone()
    out.loss.backward()
    assert torch.allclose(x.grad, 2 * first)
    x = batch["logits"].clone().requires_grad_()
    out = call(batch, x, backend=backend)
    # each result is the one gradient buffer (no copy), so clone before the next backward
    g2 = torch.autograd.grad(out.loss * 2, x, retain_graph=True)[0].clone()
    g3 = torch.autograd.grad(out.loss * 3, x, retain_graph=True)[0].clone()
    (g1,) = torch.autograd.grad(out.loss, x)
    assert torch.allclose(g2, 2 * first) and torch.allclose(g3, 3 * first) and torch.allclose(g1, first)


def test_no_grad_and_frozen_logits():
    """Logits that do not require grad: no gradient buffer, same values."""
    batch = make_batch()
    config = C(entropy_coef=0.0625, kl_coef=0.25)
    for backend in ("auto",) + tuple(p.values[1] for p in BACKENDS):
        with_grad, _, _ = run_fused(batch, config, backend)
        frozen = call(batch, batch["logits"], ref_logprobs=batch["ref"], config=config, backend=backend)
        assert not frozen.loss.requires_grad
        assert torch.equal(frozen.loss, with_grad.loss.detach())


def test_default_mask_is_labels():
    """mask=None means labels != ignore_index, and a custom ignore_index is honoured."""
    batch = make_batch()
    labels = batch["labels"].masked_fill(batch["labels"] == -100, -1)  # ignore_index = -1
    batch["labels"], batch["mask"] = labels, torch.ones_like(batch["mask"])
    config = C(entropy_coef=0.0625)
    out = fastpo.policy_loss(batch["logits"], labels, batch["old"], batch["adv"], config=config, ignore_index=-1)
    expected, _ = run_composed({**batch, "ref": None}, config, "torch", ignore_index=-1)
    assert_values_close(out, expected, 1e-5)


# ----------------------------------------------------------------------------- presets
PRESETS = [
    ("trl-dapo", presets.trl_grpo(loss_type="dapo", epsilon_high=0.28), {"num_tokens": 9.0}),
    ("trl-grpo-beta", presets.trl_grpo(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
     {"num_sequences": 2}),
    ("trl-dr-grpo", presets.trl_grpo(loss_type="dr_grpo", max_completion_length=16), {"num_sequences": 2}),
    ("trl-cispo", presets.trl_grpo(loss_type="cispo", epsilon_high=5.0), {"num_tokens": torch.tensor(6.0)}),
    ("trl-gspo", presets.trl_grpo(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4,
                                  epsilon_high=4e-4), {}),
    ("verl", presets.verl(clip_ratio_high=0.28, use_kl_loss=True, kl_loss_type="low_var_kl", entropy_coeff=0.01,
                          loss_agg_mode="seq-mean-token-mean"), {}),
    ("verl-k3+", presets.verl(use_kl_loss=True, kl_loss_type="k3+", loss_agg_mode="token-mean"), {}),
    ("openrlhf", presets.openrlhf(clip_eps_high=0.28, dual_clip=3.0, use_kl_loss=True, init_kl_coef=0.01,
                                  kl_estimator="k3"), {}),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,config,counts", PRESETS, ids=[p[0] for p in PRESETS])
def test_presets_fused_equal_from_logprobs(device, backend, name, config, counts):
    batch = make_batch(device=device)
    out, grad, _ = run_fused(batch, config, backend, counts=counts)
    expected, grad_c = run_composed(batch, config, backend, counts=counts)
    assert_values_close(out, expected, 1e-5)
    assert rel_err(grad, grad_c) <= 1e-5


# ----------------------------------------------------------------------------- module
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_module_forward_logits(device, backend):
    config = C(clip_high=0.28, kl_coef=0.25, entropy_coef=0.0625)
    batch = make_batch(device=device)
    x = batch["logits"].clone().requires_grad_()
    kwargs = dict(mask=batch["mask"], ref_logprobs=batch["ref"], num_tokens=torch.tensor(10.0))
    out = PolicyLoss(config, backend=backend).forward_logits(x, batch["labels"], batch["old"], batch["adv"], **kwargs)
    expected, grad_c = run_composed(batch, config, backend, upstream=1.0, counts={"num_tokens": 10.0})
    (grad,) = torch.autograd.grad(out.loss, x)  # upstream exactly 1: the gradient is handed back unscaled
    assert_values_close(out, expected, 1e-5)
    assert rel_err(grad, grad_c) <= 1e-5
    # call-time backend overrides the module's; inplace is forwarded
    mod = PolicyLoss(config)
    assert mod.backend == "auto" and "backend='auto'" in repr(mod)
    y = batch["logits"].clone().requires_grad_()
    out2 = mod.forward_logits(y, batch["labels"], batch["old"], batch["adv"], backend=backend,
                              inplace_backward=True, **kwargs)
    (grad2,) = torch.autograd.grad(out2.loss, y)
    assert grad2.data_ptr() == y.data_ptr() and torch.equal(grad2, grad)


def test_module_backend_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        PolicyLoss(backend="tpu")
    batch = make_batch()
    mod = PolicyLoss(backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        mod.forward_logits(batch["logits"], batch["labels"], batch["old"], batch["adv"], backend="gpu")


# ----------------------------------------------------------------------------- errors, recompiles
def _bad(**changes):
    batch = make_batch(shape=(2, 3, 11))
    args = dict(logits=batch["logits"], labels=batch["labels"], old_logprobs=batch["old"], advantages=batch["adv"])
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(logits=torch.randn(6, 11)), ValueError, r"logits must have shape \[B, T, V\]"),
        (dict(logits=torch.randn(1, 2, 3, 11)), ValueError, r"logits must have shape \[B, T, V\]"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels shape"),
        (dict(labels=torch.full((2, 3), 11)), ValueError, r"labels must lie in \[0, 11\)"),
        (dict(old_logprobs=torch.zeros(2, 4)), ValueError, "old_logprobs must have shape"),
        (dict(old_logprobs=[[0.0] * 3] * 2), TypeError, "old_logprobs must be a torch.Tensor"),
        (dict(advantages=torch.zeros(3)), ValueError, "advantages must have shape"),
        (dict(advantages=torch.zeros(2, 3, 1)), ValueError, "advantages must have shape"),
        (dict(mask=torch.ones(3, 2)), ValueError, "mask must have shape"),
        (dict(ref_logprobs=torch.zeros(2, 2)), ValueError, "ref_logprobs must have shape"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
        (dict(config=C(kl_coef=0.1)), ValueError, "needs ref_logprobs"),
        (dict(config={"clip_low": 0.2}), TypeError, "PolicyLossConfig"),
        (dict(num_tokens=0), ValueError, "num_tokens"),
        (dict(num_sequences=torch.ones(2)), ValueError, "num_sequences"),
    ],
)
def test_bad_inputs(changes, error, match):
    with pytest.raises(error, match=match):
        fastpo.policy_loss(**_bad(**changes))


def test_unavailable_backend():
    if torch.cuda.is_available():
        pytest.skip("cuda backend may be available")
    with pytest.raises(RuntimeError, match="not available"):
        fastpo.policy_loss(**_bad(backend="cuda"))


def test_one_element_count_tensor_keeps_loss_0dim():
    out = fastpo.policy_loss(**_bad(num_tokens=torch.tensor([4.0])))
    assert out.loss.shape == ()


TRITON = [p for p in BACKENDS if p.values[1] == "triton"]


@pytest.mark.skipif(not TRITON, reason="triton backend not available")
@pytest.mark.parametrize("device,backend", TRITON)
def test_hyper_parameters_are_runtime_arguments(device, backend, monkeypatch):
    """Changing clip / KL / entropy coefficients / temperature / clamps changes no constexpr of
    the fused kernel, so no new specialisation is compiled (on a GPU: one JIT cache entry)."""
    import inspect

    import fastpo.kernels.policy_loss as kernels
    from fastpo.kernels.token_logprobs import LAUNCH_OPTIONS

    LAUNCH_KEYS = {"num_warps", *LAUNCH_OPTIONS}  # compile options, fixed for every config

    real = kernels._policy_loss_fwd_kernel
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({k: v for k, v in kwargs.items() if k not in LAUNCH_KEYS})
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_policy_loss_fwd_kernel", Recorder())
    batch = make_batch(shape=(1, 2, 17), device=device)
    configs = [
        C(clip_low=0.2, clip_high=0.28, dual_clip=3.0, logratio_clamp=20.0, kl_coef=0.04, kl_clamp=10.0,
          entropy_coef=0.01, temperature=0.7),
        C(clip_low=0.1, clip_high=0.5, dual_clip=1.5, logratio_clamp=2.0, kl_coef=0.3, kl_clamp=1.0,
          entropy_coef=-0.2, temperature=1.3),
    ]
    cache = getattr(real, "device_caches", None)  # compiled JIT (GPU); the interpreter has none
    compiled = []
    for config in configs:
        run_fused(batch, config, backend)
        compiled.append(sum(len(entry[0]) for entry in cache.values()) if cache else 0)
    assert compiled[1] == compiled[0]  # the second config compiled nothing new
    assert len(launches) == 2 and launches[0] == launches[1]  # identical constexpr keyword arguments
    params = inspect.signature(real.fn).parameters
    constexprs = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
    assert constexprs and set(launches[0]) == constexprs
    hyper = {"clip_low", "clip_high", "ratio_cap", "dual_clip", "logratio_clamp", "kl_clamp", "kl_coef",
             "entropy_coef", "inv_t", "k", "ignore_index"}  # temperature arrives as 1/T and log2(e)/T
    assert hyper <= set(params) and not constexprs & hyper
