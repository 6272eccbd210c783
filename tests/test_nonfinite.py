"""NaN and -inf logits on every backend, at the public level (DESIGN.md section 3).

* A NaN anywhere in a kept row gives NaN log-prob, entropy and loss for that row, as torch
  does (a finite answer would hide a diverging run); other rows are unaffected.
* -inf logits (a masked or padded vocabulary) are exact: finite log-probs and entropy equal
  to float64 with 0 log 0 = 0, and an exactly zero gradient on the -inf entries.
"""
from __future__ import annotations

import pytest
import torch

import fastpo
from fastpo.reference.token_logprobs import token_logprobs_ref
from tests.conftest import backend_params, make_logits, rel_err

TOKEN = backend_params("token_logprobs")
SEQ = backend_params("sequence_logprobs")
POLICY = backend_params("token_logprobs")

# V = 4099 spans two Triton blocks of 4096; columns 0, 1, 7 (first vector), 1023 / 1024 (a
# lane boundary), 4095 / 4096 (the block boundary) and the last column
NAN_COLS = [0, 1, 7, 1023, 1024, 4095, 4096, 4098]
V = 4099


@pytest.mark.parametrize("device,backend", TOKEN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_in_a_kept_row_propagates(device, backend, dtype):
    rows = len(NAN_COLS) + 1
    logits = make_logits((rows, V), dtype, device)
    labels = torch.arange(rows, device=device) * 37 % V
    for r, col in enumerate(NAN_COLS):
        logits[r, col] = float("nan")
    logp, ent = fastpo.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert torch.isnan(logp[:-1]).all() and torch.isnan(ent[:-1]).all(), (logp, ent)
    # the clean last row is untouched by its neighbours
    ref_lp, ref_h = token_logprobs_ref(logits[-1:].double(), labels[-1:])
    assert torch.isfinite(logp[-1]) and rel_err(logp[-1:], ref_lp) <= 1e-5 and rel_err(ent[-1:], ref_h) <= 1e-5


@pytest.mark.parametrize("device,backend", TOKEN)
def test_nan_in_an_ignored_row_is_not_read(device, backend):
    logits = make_logits((2, 40), torch.float32, device)
    logits[0] = float("nan")
    labels = torch.tensor([-100, 3], device=device)
    x = logits.clone().requires_grad_()
    logp = fastpo.token_logprobs(x, labels, backend=backend)
    (g,) = torch.autograd.grad(logp.sum(), x)
    assert logp[0].item() == 0.0 and torch.isfinite(logp[1]) and (g[0] == 0).all()


def _masked_vocab(dtype, device, rows=5, vocab=1000):
    """Half of each row at -inf (a masked vocabulary), one row with a single finite entry."""
    logits = make_logits((rows, vocab), dtype, device)
    g = torch.Generator().manual_seed(3)
    masked = torch.rand(rows, vocab, generator=g) < 0.5
    masked[-1] = True
    masked[-1, 17] = False
    kept = [torch.nonzero(~masked[r]).flatten() for r in range(rows)]
    labels = torch.tensor([int(k[r % len(k)]) for r, k in enumerate(kept)], device=device)
    return logits.masked_fill(masked.to(device), float("-inf")), labels, masked.to(device)


@pytest.mark.parametrize("device,backend", TOKEN)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_neg_inf_logits_are_exact(device, backend, dtype, inplace):
    logits, labels, masked = _masked_vocab(dtype, device)
    x = logits.clone().requires_grad_()
    buf = x.clone() if inplace else x
    logp, ent = fastpo.token_logprobs(buf, labels, return_entropy=True, temperature=0.7,
                                      inplace_backward=inplace, backend=backend)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    g = torch.Generator().manual_seed(5)
    u_lp, u_h = torch.randn(2, len(labels), generator=g).to(device)
    (grad,) = torch.autograd.grad((logp * u_lp + ent * u_h).sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad[masked] == 0).all()  # exactly zero on the masked vocabulary
    xr = logits.detach().double().requires_grad_()
    lp_r, h_r = token_logprobs_ref(xr / 0.7, labels)
    (grad_r,) = torch.autograd.grad((lp_r * u_lp.double() + h_r * u_h.double()).sum(), xr)
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    assert rel_err(logp, lp_r) <= tol and rel_err(ent, h_r) <= tol and rel_err(grad, grad_r) <= tol
    assert ent[-1].abs().item() <= 1e-6  # one finite entry: p = 1, H = 0 exactly up to rounding


@pytest.mark.parametrize("device,backend", SEQ)
def test_sequence_logprobs_nan_and_neg_inf(device, backend):
    logits = make_logits((3, 4, 50), torch.float32, device)
    labels = torch.randint(0, 25, (3, 4)).to(device)
    logits[..., 25:] = float("-inf")  # masked upper half of the vocabulary
    logits[1, 2, 3] = float("nan")
    x = logits.clone().requires_grad_()
    out = fastpo.sequence_logprobs(x, labels, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    (grad,) = torch.autograd.grad(out[[0, 2]].sum(), x)
    # rows 0 and 2: finite, exactly zero on the masked vocabulary; row 1 takes no gradient
    assert (grad[[0, 2]][..., 25:] == 0).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", POLICY)
@pytest.mark.parametrize("variant", ["ppo", "gspo"])
def test_policy_loss_nan_and_neg_inf(device, backend, variant):
    b, t, v = 2, 3, 64
    logits = make_logits((b, t, v), torch.float32, device)
    logits[..., 40:] = float("-inf")
    labels = torch.randint(0, 40, (b, t)).to(device)
    old = torch.full((b, t), -3.0, device=device)
    ref = torch.full((b, t), -3.2, device=device)
    adv = torch.tensor([1.0, -0.5], device=device)
    cfg = fastpo.PolicyLossConfig(variant=variant, kl_coef=0.1, entropy_coef=0.01)
    x = logits.clone().requires_grad_()
    out = fastpo.policy_loss(x, labels, old, adv, ref_logprobs=ref, config=cfg, backend=backend)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all()
    (grad,) = torch.autograd.grad(out.loss, x)
    assert torch.isfinite(grad).all() and (grad[..., 40:] == 0).all()
    logits[1, 1, 5] = float("nan")
    out = fastpo.policy_loss(logits, labels, old, adv, ref_logprobs=ref, config=cfg, backend=backend)
    assert torch.isnan(out.loss) and torch.isnan(out.per_token_loss[1, 1])
