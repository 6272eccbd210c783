"""Level-3 linear ops (hidden states + lm_head) against the float64 composition.

The reference materialises the logits in float64 (``hidden.double() @ weight.double().T + bias``,
softcap, logit_scale) and runs the logits-level op with the torch backend; values and the
gradients of hidden, weight and bias (random upstream) are compared. Every backend that runs
token_logprobs here runs the linear ops (triton under the interpreter: shapes stay tiny).
Shapes: V = 37 (odd, one partial block), V = 257 (odd, just over a power of two); H = 5 and 7
(odd); chunk sizes 1, 3 (do not divide the kept rows) and None (one chunk).
"""
from __future__ import annotations

import pytest
import torch

import fastpo
from fastpo import PolicyLossConfig
from fastpo.benchmarks._measure import peak_extra_bytes
from fastpo.functional.linear import (
    linear_dpo_loss,
    linear_policy_loss,
    linear_sequence_logprobs,
    linear_token_logprobs,
)
from conftest import backend_params, make_labels, rel_err

BACKENDS = backend_params("token_logprobs")
C = PolicyLossConfig
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# norm-wise relative tolerance of values and gradients against float64: bf16 logits are
# rounded once
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------- helpers
def make_head(shape, hidden_size, vocab, dtype, *, bias=True, seed=0):
    """hidden [*shape, H], weight [V, H], bias [V] with logits of spread ~2 (realistic softmax)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * (2.0 / hidden_size**0.5)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5 if bias else None
    leaf = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(b)


def materialise(hidden, weight, bias, *, softcap=None, logit_scale=1.0, dtype=torch.float64):
    """Leaves in ``dtype`` (float64: the reference) and the logits x = cap(z) * logit_scale
    computed from them with autograd (in bf16: what PyTorch itself does in that dtype)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    z = h @ w.T + (b if b is not None else 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return leaves, z * logit_scale


def grads_of(out, leaves):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, present, retain_graph=True)


def grad_bounds(dtype, want, loss_of_logits, tensors, opts):
    """Tolerance per gradient: TOL, and in bf16 at least twice the error of PyTorch itself
    (logits materialised in bf16 with autograd through the same logits-level op)."""
    if dtype != torch.bfloat16:
        return [TOL[dtype]] * len(want)
    leaves, x = materialise(*tensors, softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale", 1.0),
                            dtype=dtype)
    own = grads_of(loss_of_logits(x), leaves)
    return [max(TOL[dtype], 2 * rel_err(o, e)) for o, e in zip(own, want)]


# ----------------------------------------------------------------------------- token log-probs
TOKEN_CASES = [
    # id, leading shape, H, V, options
    ("V37-bias-chunk3", (2, 5), 7, 37, dict(chunk_size=3)),
    ("V257-softcap-scale-temp-chunk1", (2, 3), 5, 257,
     dict(chunk_size=1, temperature=0.5, softcap=4.0, logit_scale=0.5)),
    ("flat-rows-nobias-onechunk", (12,), 7, 37, dict(chunk_size=None, temperature=2.0, bias=False)),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,hidden_size,vocab,opts", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_logprobs_vs_float64(device, backend, dtype, name, shape, hidden_size, vocab, opts):
    opts = dict(opts)
    hidden, weight, bias = make_head(shape, hidden_size, vocab, dtype, bias=opts.pop("bias", True))
    labels = make_labels(shape, vocab, ignore_frac=0.25)
    logp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                      backend=backend, **opts)
    g = torch.Generator().manual_seed(3)
    u, v = (torch.randn(labels.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def composed(x):  # the logits-level op on materialised logits, and the loss of a random upstream
        lp, en = fastpo.token_logprobs(x, labels, temperature=opts.get("temperature", 1.0), return_entropy=True,
                                       backend="torch")
        return lp, en, (lp.double() * u + en.double() * v).sum()

    leaves, x = materialise(hidden, weight, bias, softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale", 1.0))
    logp_r, ent_r, loss_r = composed(x)
    assert logp.shape == labels.shape and logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(logp, logp_r) <= TOL[dtype] and rel_err(ent, ent_r) <= TOL[dtype]
    assert (logp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    got = grads_of((logp.double() * u + ent.double() * v).sum(), (hidden, weight, bias))
    want = grads_of(loss_r, leaves)
    bounds = grad_bounds(dtype, want, lambda xb: composed(xb)[2], (hidden, weight, bias), opts)
    for gr, e, t, bound in zip(got, want, [x for x in (hidden, weight, bias) if x is not None], bounds):
        assert gr.dtype == dtype and gr.shape == t.shape
        assert rel_err(gr, e) <= bound, (rel_err(gr, e), bound, t.shape)
    dh = got[0].reshape(-1, hidden_size)[labels.reshape(-1) == -100]
    assert (dh == 0).all()  # ignored rows: exactly zero gradient


# ----------------------------------------------------------------------------- policy loss
POLICY_CASES = [
    # id, config, options of the call
    ("ppo-k3-entropy-fused", C(kl_coef=0.25, entropy_coef=0.0625, temperature=0.5), dict(chunk_size=3)),
    ("cispo-softcap", C(variant="cispo", clip_low=0.5, clip_high=0.25, entropy_coef=0.0625),
     dict(chunk_size=1, softcap=4.0)),
    ("sapo-policy-weights", C(variant="sapo", agg="seq-mean-token-sum"), dict(policy_weights=True)),
    ("gspo-two-pass", C(variant="gspo", entropy_coef=0.0625, agg="seq-mean-token-mean"),
     dict(chunk_size=3, logit_scale=0.5)),
    ("kl-entropy-agg", C(kl_coef=0.25, kl_agg="token-mean", entropy_coef=0.0625, entropy_agg="token-mean",
                         agg="seq-mean-token-sum-norm"), dict(chunk_size=4)),
]


def policy_batch(dtype, vocab=37, hidden_size=7, *, scale=1.0, seed=0):
    """old / ref log-probs centred on the true ones (``scale`` = logit_scale / temperature), so
    ratios straddle the clip range; a mask with zeros and ignored labels."""
    b, t = 2, 5
    hidden, weight, bias = make_head((b, t), hidden_size, vocab, dtype, seed=seed)
    labels = make_labels((b, t), vocab, ignore_frac=0.2, seed=seed + 1)
    labels[0, 0] = labels[0, 0].clamp_min(0)
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.rand(b, t, generator=g) > 0.2
    mask[0, 0] = True
    with torch.no_grad():
        _, x = materialise(hidden, weight, bias)
        lp = fastpo.token_logprobs(x * scale, labels, backend="torch")
    noise = lambda: 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)  # noqa: E731
    adv = torch.tensor([1.0, -0.5])
    pw = torch.rand(b, t, generator=g).float() + 0.5
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, adv=adv,
                old=(lp + noise()).float(), ref=(lp + noise()).float(), pw=pw)


def policy_args(batch, opts):
    opts = dict(opts)
    if opts.pop("policy_weights", False):
        opts["policy_weights"] = batch["pw"]
    return (batch["labels"], batch["old"], batch["adv"]), dict(mask=batch["mask"], ref_logprobs=batch["ref"], **opts)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,config,opts", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
def test_policy_loss_vs_float64(device, backend, dtype, name, config, opts):
    batch = policy_batch(dtype, scale=opts.get("logit_scale", 1.0) / config.temperature)
    hidden, weight, bias = batch["hidden"], batch["weight"], batch["bias"]
    args, kw = policy_args(batch, opts)
    out = linear_policy_loss(hidden, weight, *args, bias=bias, config=config, backend=backend, **kw)
    leaves, x = materialise(hidden, weight, bias, softcap=kw.get("softcap"), logit_scale=kw.get("logit_scale", 1.0))
    for k in ("softcap", "logit_scale", "chunk_size"):
        kw.pop(k, None)
    ref = fastpo.policy_loss(x, *args, config=config, backend="torch", **kw)
    tol = TOL[dtype]
    assert out.loss.shape == () and not out.per_token_loss.requires_grad
    assert rel_err(out.loss, ref.loss) <= tol and rel_err(out.per_token_loss, ref.per_token_loss) <= tol
    # metrics are O(1) means (approx_kl, clip fractions): bf16 logits (spacing ~1e-2) move them
    # by that much in absolute terms
    atol = tol if dtype == torch.bfloat16 else 1e-6
    for key, value in out.metrics.items():
        torch.testing.assert_close(value.double(), ref.metrics[key].double(), rtol=max(tol, 1e-6), atol=atol)
    got = grads_of(out.loss * 1.7, (hidden, weight, bias))
    want = grads_of(ref.loss * 1.7, leaves)
    bounds = grad_bounds(dtype, want, lambda xb: fastpo.policy_loss(xb, *args, config=config, backend="torch",
                                                                    **kw).loss * 1.7, (hidden, weight, bias), opts)
    for gr, e, bound in zip(got, want, bounds):
        assert gr.dtype == dtype
        assert rel_err(gr, e) <= bound, (rel_err(gr, e), bound)
    skipped = ~(batch["mask"] & (batch["labels"] != -100))
    assert (got[0][skipped] == 0).all()  # masked and ignored rows: exactly zero gradient


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_policy_repeated_backward_and_frozen_head(device, backend):
    """The stored gradient is rescaled correctly on a second backward (GradBuffer), and a frozen
    lm_head (weight without grad, no bias) still gives dL/dhidden."""
    batch = policy_batch(torch.float32)
    hidden, weight = batch["hidden"], batch["weight"].detach()
    args, kw = policy_args(batch, dict(chunk_size=3))
    out = linear_policy_loss(hidden, weight, *args, config=C(kl_coef=0.25), backend=backend, **kw)
    (g1,) = torch.autograd.grad(out.loss, hidden, retain_graph=True)
    g1 = g1.clone()  # the backward returns the stored buffer itself, rescaled in place next time
    (g2,) = torch.autograd.grad(out.loss * 3.0, hidden)
    assert rel_err(g2, 3.0 * g1) <= 1e-6
    leaves, x = materialise(hidden, weight, None)
    kw.pop("chunk_size")
    ref = fastpo.policy_loss(x, *args, config=C(kl_coef=0.25), backend="torch", **kw)
    (g_ref,) = torch.autograd.grad(ref.loss, leaves[0])
    assert rel_err(g1, g_ref) <= 1e-5


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton"])
def test_gradcheck(device, backend):
    """float64 gradcheck in hidden, weight and bias (triton skipped: slow under the interpreter)."""
    hidden, weight, bias = make_head((2, 3), 3, 5, torch.float64)
    labels = torch.tensor([[0, 4, -100], [2, 1, 3]])
    old = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -1.7, -2.2]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def token(h, w, b):
        lp, ent = linear_token_logprobs(h, w, labels, bias=b, softcap=2.0, temperature=0.5, return_entropy=True,
                                        chunk_size=2, backend=backend)
        return lp, ent

    def policy(h, w, b):
        return linear_policy_loss(h, w, labels, old, adv, bias=b, ref_logprobs=old,
                                  config=C(kl_coef=0.25, entropy_coef=0.0625), chunk_size=2, backend=backend).loss

    def gspo(h, w, b):
        return linear_policy_loss(h, w, labels, old, adv, bias=b, config=C(variant="gspo", agg="seq-mean-token-mean"),
                                  chunk_size=2, backend=backend).loss

    for fn in (token, policy, gspo):
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias), atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- fp32 head, bf16 hidden
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("op", ["token", "policy"])
def test_fp32_head_with_bf16_hidden(device, backend, op):
    """An fp32 lm_head with bf16 hidden states (autocast; a head kept in fp32): the op computes
    exactly what it computes on the head cast to bf16 (values, dL/dhidden bitwise), while dW and
    db come back fp32, accumulated from the bf16 chunks without a 16-bit rounding (most entries
    are not bf16 numbers), within the bf16 bounds of the float64 composition. Chunk 3 of 8 kept
    rows: several chunks, one partial."""
    batch = policy_batch(torch.bfloat16)
    hidden = batch["hidden"]
    head32 = [t.detach().float().requires_grad_() for t in (batch["weight"], batch["bias"])]
    head16 = [t.detach().requires_grad_() for t in (batch["weight"], batch["bias"])]
    args, kw = policy_args(batch, dict(chunk_size=3))

    def run(weight, bias):
        if op == "token":
            lp = linear_token_logprobs(hidden, weight, batch["labels"], bias=bias, chunk_size=3, backend=backend)
            value, loss = lp, (lp * batch["adv"].unsqueeze(-1)).sum()
        else:
            out = linear_policy_loss(hidden, weight, *args, bias=bias, config=C(kl_coef=0.25), backend=backend, **kw)
            value, loss = out.per_token_loss, out.loss
        return value, torch.autograd.grad(loss, (hidden, weight, bias))

    value32, (dh32, dw32, db32) = run(*head32)
    value16, (dh16, dw16, db16) = run(*head16)
    assert torch.equal(value32, value16) and torch.equal(dh32, dh16) and dh32.dtype == torch.bfloat16
    assert dw32.dtype == db32.dtype == torch.float32
    assert (dw32 != dw32.bfloat16().float()).float().mean() > 0.5  # not rounded through bf16
    # against float64 on the bf16 head: no worse than the bf16 op's own dW and db, within TOL
    leaves, x = materialise(hidden, *head16)
    if op == "token":
        ref = (fastpo.token_logprobs(x, batch["labels"], backend="torch") * batch["adv"].unsqueeze(-1)).sum()
    else:
        kw.pop("chunk_size")
        ref = fastpo.policy_loss(x, *args, config=C(kl_coef=0.25), backend="torch", **kw).loss
    _, want_w, want_b = grads_of(ref, leaves)
    for got, own, want in ((dw32, dw16, want_w), (db32, db16, want_b)):
        assert rel_err(got, want) <= max(TOL[torch.bfloat16], rel_err(own, want)), (rel_err(got, want), rel_err(own, want))


# ----------------------------------------------------------------------------- sequence / DPO
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sequence_logprobs_and_dpo(device, backend):
    hidden, weight, bias = make_head((4, 5), 7, 37, torch.float32)
    labels = make_labels((4, 5), 37, ignore_frac=0.3)
    labels[:, 0] = 3  # every row has a completion token (length-normalised types)
    leaves, x = materialise(hidden, weight, bias)
    for average in (False, True):
        got = linear_sequence_logprobs(hidden, weight, labels, bias=bias, average=average, chunk_size=3,
                                       backend=backend)
        want = fastpo.sequence_logprobs(x, labels, average=average, backend="torch")
        assert got.shape == (4,) and rel_err(got, want) <= 1e-5
    refs = (torch.tensor([-20.0, -18.0]), torch.tensor([-19.0, -21.0]))
    for loss_type in ("sigmoid", "ipo"):
        out = linear_dpo_loss(hidden, weight, labels, *refs, bias=bias, beta=0.1, loss_type=loss_type,
                              chunk_size=3, backend=backend)
        ref = fastpo.dpo_loss(x, labels, *refs, beta=0.1, loss_type=loss_type, backend="torch")
        assert rel_err(out.loss, ref.loss) <= 1e-5 and rel_err(out.margins, ref.margins) <= 1e-5
        got = grads_of(out.loss, (hidden, weight, bias))
        want = grads_of(ref.loss, leaves)
        for gr, e in zip(got, want):
            assert rel_err(gr, e) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_ignored(device, backend):
    """No kept token: no matmul, zeros, exactly zero gradients."""
    hidden, weight, bias = make_head((2, 3), 5, 37, torch.float32)
    labels = torch.full((2, 3), -100)
    lp = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    assert (lp == 0).all()
    grads = torch.autograd.grad(lp.sum(), (hidden, weight, bias))
    assert all((g == 0).all() for g in grads)
    out = linear_policy_loss(hidden, weight, labels, torch.zeros(2, 3), torch.ones(2), bias=bias, backend=backend)
    assert out.loss.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(out.loss, (hidden, weight, bias)))


# ----------------------------------------------------------------------------- memory
@pytest.mark.skipif(not fastpo.ops.registry.backends_for("token_logprobs", "cpu").count("cpu"),
                    reason="needs the C++ cpu backend")
def test_peak_memory_below_logits():
    """N = 512 kept rows, V = 4096, H = 16, chunk 64: the N x V fp32 logits (8 MiB) are never
    held; peak extra memory (forward + backward, gradients included) stays a few chunks."""
    n, vocab, hidden_size, chunk = 512, 4096, 16, 64
    hidden, weight, _ = make_head((n,), hidden_size, vocab, torch.float32, bias=False)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    full = n * vocab * 4

    def token():
        lp = linear_token_logprobs(hidden, weight, labels, chunk_size=chunk, backend="cpu")
        return torch.autograd.grad(lp.sum(), (hidden, weight))

    def policy():
        h, lab = hidden.view(8, 64, hidden_size), labels.view(8, 64)
        out = linear_policy_loss(h, weight, lab, torch.full((8, 64), -8.0), torch.ones(8), chunk_size=chunk,
                                 backend="cpu")
        return torch.autograd.grad(out.loss, (h, weight))

    for fn in (token, policy):
        peak = peak_extra_bytes(fn, torch.device("cpu"))
        assert peak < full / 2, (fn.__name__, peak, full)


# ----------------------------------------------------------------------------- bad inputs
def _bad_cases():
    h, w, b = (t.detach() for t in make_head((2, 3), 4, 10, torch.float32))
    lab = torch.zeros(2, 3, dtype=torch.long)
    return [
        ("hidden-int", dict(hidden=h.long()), ValueError, "hidden must be float32"),
        ("weight-H", dict(weight=w[:, :3]), ValueError, r"weight must have shape \[V, H\]"),
        ("weight-1d", dict(weight=w[0]), ValueError, r"weight must have shape \[V, H\]"),
        ("labels-shape", dict(labels=lab[:, :2]), ValueError, "labels shape"),
        ("labels-float", dict(labels=lab.float()), ValueError, "labels must be an integer"),
        ("labels-range", dict(labels=lab + 10), ValueError, r"labels must lie in \[0, 10\)"),
        ("bias-shape", dict(bias=b[:5]), ValueError, r"bias must have shape \[V\]"),
        ("weight-dtype", dict(weight=w.double()), ValueError, "weight dtype"),
        ("bias-dtype", dict(bias=b.half()), ValueError, "bias dtype"),
        ("softcap-0", dict(softcap=0.0), ValueError, "softcap must be"),
        ("softcap-nan", dict(softcap=float("nan")), ValueError, "softcap must be"),
        ("scale-neg", dict(logit_scale=-1.0), ValueError, "logit_scale must be"),
        ("temperature-0", dict(temperature=0.0), ValueError, "temperature must be"),
        ("chunk-0", dict(chunk_size=0), ValueError, "chunk_size must be"),
        ("chunk-float", dict(chunk_size=2.0), ValueError, "chunk_size must be"),
        ("backend", dict(backend="nope"), ValueError, "unknown backend"),
        ("process-group", dict(process_group=object()), RuntimeError, "not initialised"),
    ], dict(hidden=h, weight=w, labels=lab, bias=b)


_CASES, _GOOD = _bad_cases()


@pytest.mark.parametrize("name,change,exc,match", _CASES, ids=[c[0] for c in _CASES])
def test_bad_inputs(name, change, exc, match):
    kw = {**_GOOD, **change}
    with pytest.raises(exc, match=match):
        linear_token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)


def test_bad_policy_inputs():
    h, w, b = (t.detach() for t in make_head((2, 3), 4, 10, torch.float32))
    lab = torch.zeros(2, 3, dtype=torch.long)
    old, adv = torch.zeros(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\]"):
        linear_policy_loss(h[0], w, lab[0], old, adv)
    with pytest.raises(ValueError, match="old_logprobs must have shape"):
        linear_policy_loss(h, w, lab, old[:, :2], adv)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        linear_policy_loss(h, w, lab, old, adv, config=C(kl_coef=0.1))
    with pytest.raises(RuntimeError, match="not initialised"):  # process_group: tests/test_linear_vocab_parallel.py
        linear_policy_loss(h, w, lab, old, adv, process_group=object())
    with pytest.raises(ValueError, match="2B rows"):
        linear_dpo_loss(h[:1], w, lab[:1], torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_extra_outputs_match_the_materialised_logits(dtype):
    """mean_logits, log_sum_sq_probs, is_top1 (TRL's fused-head extras): no gradient, 0 / False
    at ignored positions, equal to their definitions on the materialised transformed logits."""
    g = torch.Generator().manual_seed(7)
    n, h, v = 11, 6, 41
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 2).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    x64 = hidden.detach().double() @ weight.double().T + bias.double()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    labels[5] = int(x64[5].argmax())  # at least one top-1 hit
    logp, ent, mean, lss, top1 = fastpo.linear_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=0.8, softcap=5.0, logit_scale=1.5, return_entropy=True,
        return_mean_logits=True, return_log_sum_sq_probs=True, return_is_top1=True, chunk_size=4)
    z = x64 if dtype in (torch.float32, torch.float64) else x64.to(dtype).double()
    xs = 5.0 * torch.tanh(z / 5.0)
    xs = (xs if dtype in (torch.float32, torch.float64) else xs.to(dtype).double()) * 1.5 / 0.8
    keep = labels != -100
    p = torch.softmax(xs, -1)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(mean[keep], xs.mean(-1)[keep]) <= tol and mean[3] == 0
    assert rel_err(lss[keep], torch.log((p * p).sum(-1))[keep]) <= tol and lss[3] == 0
    assert top1.dtype == torch.bool and not top1[3] and top1[5]
    assert torch.equal(top1[keep], (xs.argmax(-1) == labels)[keep])
    assert not mean.requires_grad and not lss.requires_grad and logp.requires_grad
    assert fastpo.linear_token_logprobs(hidden, weight, labels, return_is_top1=True)[1].dtype == torch.bool
