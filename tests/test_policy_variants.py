"""Policy-parity features (variants sapo / pg / gmpo / vespo, gspo's seq_ratio / seq_ratio_grad /
seq_logratio_max, kl_importance_weighted, off_policy_mask_threshold, top_entropy_quantile,
kl_agg / entropy_agg, policy_weights, rollout_logprobs, aux_num_tokens) against an independent
float64 oracle written here per sequence from the papers' formulas (values and gradients),
fully masked rows, NaN handling, validation, and the fused policy_loss (composed path) against
the composed reference on every backend."""
import math

import pytest
import torch

import fastpo
from fastpo.config import PolicyLossConfig as C
from fastpo.functional.policy_loss import policy_loss_from_logprobs
from fastpo.ops.policy_loss import fused_kernel_applies

from conftest import backend_params, make_labels, make_logits, rel_err

B, T = 4, 6
LENGTHS = [6, 3, 0, 1]  # full row, padded row, fully masked row, one-token row


def _batch(dtype=torch.float64, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.5
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    roll = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.1
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    cast = lambda x: x.to(dtype)  # noqa: E731
    return dict(lp=cast(lp).requires_grad_(), old=cast(old), ref=cast(ref), roll=cast(roll),
                ent=cast(ent).requires_grad_(), adv=cast(adv), w=cast(w), mask=mask)


def _oracle(d, cfg, *, weights=None, rollout=None, num_tokens=None, num_sequences=None, aux=None):
    """Per-sequence float64 transcription; returns the loss (differentiable in lp and ent)."""
    lp, old, ent = d["lp"].double(), d["old"].double(), d["ent"].double()
    ref = d["ref"].double()
    adv = d["adv"].double()
    adv = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
    S = B if num_sequences is None else num_sequences
    # top-entropy mask over the kept tokens of the batch
    keep_all = [[d["mask"][i, t].item() for t in range(T)] for i in range(B)]
    kept_h = torch.stack([ent[i, t].detach() for i in range(B) for t in range(T) if keep_all[i][t]])
    thr = torch.quantile(kept_h, 1 - cfg.top_entropy_quantile) if cfg.top_entropy_quantile < 1 else -math.inf
    pol, kls, ents, per_tok = [], [], [], []
    n_tok = sum(LENGTHS)
    n_eff = 0
    for i in range(B):
        n = LENGTHS[i]
        idx = list(range(n))
        lr = [lp[i, t] - old[i, t] for t in idx]
        if cfg.logratio_clamp is not None:
            lr = [x.clamp(-cfg.logratio_clamp, cfg.logratio_clamp) for x in lr]
        r = [x.exp() for x in lr]
        rows_pg, rows_rho = [], []
        if cfg.variant == "gspo":
            tot = sum(lr) if n else torch.zeros((), dtype=torch.float64)
            ls = tot if cfg.seq_ratio == "sum" else tot / max(1, n)
            for t in idx:
                if cfg.seq_ratio_grad == "sequence":
                    x = ls
                else:
                    x = ls.detach() + lp[i, t] - lp[i, t].detach()
                if cfg.seq_logratio_max is not None:
                    x = torch.clamp(x, max=cfg.seq_logratio_max)
                s = x.exp()
                a = adv[i, t]
                lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
                rows_pg.append(-torch.min(s * a, s.clamp(lo, hi) * a))
                rows_rho.append(s)
        elif cfg.variant == "sapo":
            for t in idx:
                a = adv[i, t]
                tau = cfg.sapo_tau_pos if a > 0 else cfg.sapo_tau_neg
                rows_pg.append(-a * 4.0 / tau * torch.sigmoid(tau * (r[t] - 1)))
                rows_rho.append(r[t])
        elif cfg.variant == "pg":
            rows_pg = [-adv[i, t] * lp[i, t] for t in idx]
            rows_rho = r
        elif cfg.variant == "gmpo":
            abar = sum(adv[i, t] for t in idx) / max(1, n) if n else 0.0
            cs = []
            for t in idx:
                lo_b, hi_b = math.log(1 - cfg.clip_low), math.log(1 + cfg.clip_high)
                x, xc = lr[t], lr[t].clamp(lo_b, hi_b)
                a = adv[i, t]
                cs.append(torch.min(x, xc) if a > 0 else (torch.max(x, xc) if a < 0 else 0 * x))
            R = (sum(cs) / max(1, n)).exp() if n else 1.0
            seq_w = 1.0
            if weights is not None and n:
                seq_w = math.exp(sum(math.log(weights[i, t].item() + 1e-10) for t in idx) / n)
            rows_pg = [-abar * R * seq_w for _ in idx]
            rows_rho = r
        elif cfg.variant == "vespo":
            lw = sum(float((lp[i, t].detach() - old[i, t]).clamp(-20, 20)) for t in idx)
            if weights is not None:
                lw += sum(min(max(math.log(weights[i, t].item()), math.log(1e-8)), 20.0) for t in idx)
            lw = min(max(lw, math.log(1e-8)), 20.0)
            for t in idx:
                a = adv[i, t]
                k, lam = (cfg.vespo_k_pos, cfg.vespo_lambda_pos) if a >= 0 else (cfg.vespo_k_neg, cfg.vespo_lambda_neg)
                lam = max(lam, 1e-4)
                phi = math.exp(lam + k * lw - lam * math.exp(lw))
                rows_pg.append(-phi * a * lp[i, t])
            rows_rho = r
        else:  # ppo
            for t in idx:
                a = adv[i, t]
                rows_pg.append(-torch.min(r[t] * a, r[t].clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a))
            rows_rho = r
        # masks and weights on the policy term
        if cfg.off_policy_mask_threshold is not None:
            src = old if rollout is None else rollout.double()
            dkl = sum(float(torch.nan_to_num(src[i, t] - lp[i, t].detach(), nan=0.0)) for t in idx) / max(1, n)
        for j, t in enumerate(idx):
            p = rows_pg[j]
            if cfg.off_policy_mask_threshold is not None and not (adv[i, t] >= 0 or dkl <= cfg.off_policy_mask_threshold):
                p = p * 0.0
            in_top = bool(ent[i, t].detach() >= thr)
            if not in_top:
                p = p * 0.0
            if weights is not None and cfg.variant not in ("gmpo", "vespo"):
                p = p * weights[i, t].double()
            kl = 0.0
            if cfg.kl_coef:
                dd = ref[i, t] - lp[i, t]
                k3 = dd.exp() - dd - 1
                kl = cfg.kl_coef * k3 * (rows_rho[j] if cfg.kl_importance_weighted else 1.0)
            h = cfg.entropy_coef * ent[i, t] if in_top else 0.0 * ent[i, t]
            n_eff += int(in_top)
            pol.append((i, p))
            kls.append((i, kl))
            ents.append((i, h, in_top))
            per_tok.append((i, p + kl - h))

    def agg(items, mode, tokens, count_of=None):
        if mode == "token-mean":
            return sum(x for _, x in items) / tokens
        total = 0.0
        for i in range(B):
            row = [x for k, x in items if k == i]
            cnt = count_of(i) if count_of else LENGTHS[i]
            if mode == "seq-mean-token-mean":
                total = total + (sum(row) / max(1, cnt) if row else 0.0)
            else:
                total = total + (sum(row) if row else 0.0)
        scale = (T if cfg.agg_scale is None else cfg.agg_scale) if mode == "seq-mean-token-sum-norm" else 1.0
        return total / (S * scale)

    tokens = max(1, n_tok) if num_tokens is None else num_tokens
    if cfg.kl_agg is None and cfg.entropy_agg is None:
        return agg(per_tok, cfg.agg, tokens)
    main = [(i, p + (kls[j][1] if cfg.kl_agg is None else 0.0) - (ents[j][1] if cfg.entropy_agg is None else 0.0))
            for j, (i, p) in enumerate(pol)]
    loss = agg(main, cfg.agg, tokens)
    if cfg.kl_agg is not None and cfg.kl_coef:
        loss = loss + agg(kls, cfg.kl_agg, max(1, n_tok) if aux is None else aux)
    if cfg.entropy_agg is not None and cfg.entropy_coef:
        eff = [(i, h) for i, h, top in ents if top]
        per_row = lambda i: sum(1 for k, _, top in ents if k == i and top)  # noqa: E731
        loss = loss - agg(eff, cfg.entropy_agg, max(1, n_eff) if aux is None else aux, per_row)
    return loss


CASES = {
    "sapo": C(variant="sapo"),
    "sapo-temps-kl": C(variant="sapo", sapo_tau_pos=0.5, sapo_tau_neg=3.0, kl_coef=0.1, logratio_clamp=0.3),
    "pg": C(variant="pg", agg="seq-mean-token-sum"),
    "pg-kl-weighted": C(variant="pg", kl_coef=0.2, kl_importance_weighted=True),
    "gmpo": C(variant="gmpo", agg="seq-mean-token-mean"),
    "gmpo-wide": C(variant="gmpo", clip_low=0.33, clip_high=0.49, agg="seq-mean-token-mean"),
    "vespo": C(variant="vespo"),
    "vespo-shape": C(variant="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.0, vespo_k_neg=4.0, vespo_lambda_neg=0.5),
    "gspo-sequence-grad": C(variant="gspo", seq_ratio_grad="sequence", clip_low=0.1, clip_high=0.1),
    "gspo-sum": C(variant="gspo", seq_ratio="sum", seq_ratio_grad="sequence", agg="seq-mean-token-mean"),
    "gspo-seq-max": C(variant="gspo", seq_logratio_max=-0.05, clip_high=10.0, agg="seq-mean-token-mean"),
    "gspo-seq-max-sequence": C(variant="gspo", seq_ratio_grad="sequence", seq_logratio_max=-0.05, clip_high=10.0),
    "ppo-kl-weighted": C(kl_coef=0.1, kl_importance_weighted=True, agg="seq-mean-token-mean"),
    "gspo-kl-weighted": C(variant="gspo", seq_ratio_grad="sequence", kl_coef=0.1, kl_importance_weighted=True),
    "off-policy": C(off_policy_mask_threshold=0.0),
    "top-entropy": C(top_entropy_quantile=0.5, entropy_coef=0.05),
    "top-entropy-zero": C(top_entropy_quantile=0.0, entropy_coef=0.05, agg="seq-mean-token-sum-norm"),
    "kl-agg": C(agg="seq-mean-token-mean", kl_coef=0.1, kl_agg="token-mean", entropy_coef=0.02,
                entropy_agg="seq-mean-token-mean"),
    "entropy-agg-top": C(variant="sapo", top_entropy_quantile=0.3, entropy_coef=0.05, entropy_agg="token-mean"),
    "everything": C(variant="gspo", seq_ratio_grad="sequence", kl_coef=0.1, kl_importance_weighted=True,
                    off_policy_mask_threshold=0.01, top_entropy_quantile=0.7, entropy_coef=0.03,
                    kl_agg="token-mean", entropy_agg="token-mean", agg="seq-mean-token-sum"),
}


@pytest.mark.parametrize("extras", ["plain", "weights", "rollout", "counts"])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_oracle(name, per_token_adv, extras, dtype):
    cfg = CASES[name]
    d = _batch(dtype, per_token_adv=per_token_adv)
    kw, ok = {}, {}
    if extras == "weights":
        kw["policy_weights"] = ok["weights"] = d["w"]
    if extras == "rollout":
        kw["rollout_logprobs"] = ok["rollout"] = d["roll"]
    if extras == "counts":
        kw.update(num_tokens=17.0, num_sequences=7.0)
        ok.update(num_tokens=17.0, num_sequences=7.0)
        if cfg.kl_agg or cfg.entropy_agg:
            kw["aux_num_tokens"] = ok["aux"] = 13.0
    out = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"], entropy=d["ent"],
                                    config=cfg, **kw)
    d2 = dict(d, lp=d["lp"].detach().clone().requires_grad_(), ent=d["ent"].detach().clone().requires_grad_())
    want = _oracle(d2, cfg, **ok)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), want.double(), **tol)
    g = torch.autograd.grad(out.loss, [d["lp"], d["ent"]], allow_unused=True)
    gw = torch.autograd.grad(want, [d2["lp"], d2["ent"]], allow_unused=True)
    for a, b in zip(g, gw):
        a = torch.zeros(B, T, dtype=torch.float64) if a is None else a.double()
        b = torch.zeros(B, T, dtype=torch.float64) if b is None else b.double()
        torch.testing.assert_close(a, b, **tol)
        assert not a[~d["mask"]].any()  # exactly zero gradient at masked positions
    assert not out.per_token_loss[~d["mask"]].any()
    assert out.per_token_loss[2].eq(0).all()  # fully masked row


def test_gspo_grad_forms_differ_only_in_gradient():
    d = _batch(per_token_adv=True)
    a = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], config=C(variant="gspo"))
    b = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"],
                                  config=C(variant="gspo", seq_ratio_grad="sequence"))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    ga, = torch.autograd.grad(a.loss, d["lp"])
    gb, = torch.autograd.grad(b.loss, d["lp"])
    assert (ga - gb).abs().max() > 1e-3  # advantages vary within a sequence
    # per-sequence advantages: identical gradients too (GSPO's eq. 10 = 11)
    d = _batch()
    a = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], config=C(variant="gspo"))
    b = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"],
                                  config=C(variant="gspo", seq_ratio_grad="sequence"))
    torch.testing.assert_close(torch.autograd.grad(a.loss, d["lp"])[0], torch.autograd.grad(b.loss, d["lp"])[0])


def test_off_policy_mask_nan_rollout_counts_as_zero():
    d = _batch()
    roll = d["roll"].clone()
    roll[0, 1] = float("nan")  # an engine that could not score a token
    cfg = C(off_policy_mask_threshold=0.05)
    out = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], config=cfg, rollout_logprobs=roll)
    fixed = roll.clone()
    fixed[0, 1] = d["lp"].detach()[0, 1]  # a zero difference
    want = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], config=cfg, rollout_logprobs=fixed)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, want.loss)
    # NaN at masked positions never enters; NaN in the weights of a kept token does (as torch)
    w = d["w"].clone()
    w[1, 5] = float("nan")  # masked
    assert torch.isfinite(policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], policy_weights=w).loss)
    w[1, 0] = float("nan")  # kept
    assert torch.isnan(policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], d["mask"], policy_weights=w).loss)


@pytest.mark.parametrize("cfg", [C(variant="gmpo"), C(variant="vespo"), C(variant="sapo", kl_coef=0.1,
                                 kl_importance_weighted=True), C(top_entropy_quantile=0.5, entropy_coef=0.1,
                                 entropy_agg="token-mean")])
def test_all_masked_batch_is_exact_zero(cfg):
    d = _batch()
    mask = torch.zeros(B, T, dtype=torch.bool)
    out = policy_loss_from_logprobs(d["lp"], d["old"], d["adv"], mask, ref_logprobs=d["ref"], entropy=d["ent"],
                                    config=cfg, policy_weights=d["w"])
    assert out.loss.item() == 0.0 and not out.per_token_loss.any()
    g = torch.autograd.grad(out.loss, [d["lp"], d["ent"]], allow_unused=True)
    assert all(x is None or not x.any() for x in g)


def test_vespo_extreme_ratio_gives_zero_weight_not_nan():
    d = _batch()
    old = d["old"].clone()
    old[0] = old[0] - 40.0  # log w clamped at 20: phi = exp(lam + 20 k - lam e^20) underflows to 0
    out = policy_loss_from_logprobs(d["lp"], old, d["adv"], d["mask"], config=C(variant="vespo"))
    assert torch.isfinite(out.loss)
    assert not out.per_token_loss[0].any()


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(variant="gmpo", dual_clip=2.0), "dual_clip"),
        (dict(variant="sapo", ratio_cap=2.0), "ratio_cap"),
        (dict(seq_ratio="sum", seq_ratio_grad="sequence"), "gspo"),
        (dict(variant="gspo", seq_ratio="sum"), "seq_ratio_grad"),
        (dict(variant="gspo", seq_ratio="max"), "seq_ratio"),
        (dict(variant="gspo", seq_ratio_grad="both"), "seq_ratio_grad"),
        (dict(seq_logratio_max=10.0), "gspo"),
        (dict(variant="gspo", seq_logratio_max=math.inf), "seq_logratio_max"),
        (dict(kl_importance_weighted=1), "kl_importance_weighted"),
        (dict(off_policy_mask_threshold=math.nan), "off_policy_mask_threshold"),
        (dict(top_entropy_quantile=-0.1), "top_entropy_quantile"),
        (dict(kl_agg="mean"), "kl_agg"),
        (dict(entropy_agg="sum"), "entropy_agg"),
        (dict(sapo_tau_neg=-1.0), "sapo_tau_neg"),
        (dict(vespo_k_pos=math.inf), "vespo_k_pos"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        C(**fields)


def test_bad_call_arguments():
    d = _batch(torch.float32)
    args = (d["lp"], d["old"], d["adv"], d["mask"])
    with pytest.raises(ValueError, match="policy_weights must have shape"):
        policy_loss_from_logprobs(*args, policy_weights=torch.ones(B, T + 1))
    with pytest.raises(ValueError, match="policy_weights must be a floating"):
        policy_loss_from_logprobs(*args, policy_weights=torch.ones(B, dtype=torch.long))
    with pytest.raises(ValueError, match="rollout_logprobs must have shape"):
        policy_loss_from_logprobs(*args, rollout_logprobs=torch.ones(B, 1))
    with pytest.raises(ValueError, match="aux_num_tokens"):
        policy_loss_from_logprobs(*args, aux_num_tokens=3)  # no kl_agg / entropy_agg: would be ignored
    with pytest.raises(ValueError, match="aux_num_tokens"):
        policy_loss_from_logprobs(*args, config=C(kl_agg="token-mean"), aux_num_tokens=0)
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss_from_logprobs(*args, config=C(top_entropy_quantile=0.5))


def test_routing():
    """Token-local features take the fused kernel; sequence-level ones the two-phase path."""
    fused = ["sapo", "sapo-temps-kl", "pg", "pg-kl-weighted", "ppo-kl-weighted", "kl-agg"]
    assert all(fused_kernel_applies(CASES[name]) for name in fused)
    assert fused_kernel_applies(C()) and fused_kernel_applies(C(variant="cispo"))
    assert not any(fused_kernel_applies(cfg) for name, cfg in CASES.items() if name not in fused)


FUSED_CASES = ["sapo-temps-kl", "pg-kl-weighted", "gmpo", "vespo", "gspo-sum", "gspo-seq-max", "off-policy",
               "top-entropy", "kl-agg", "everything"]


@pytest.mark.parametrize("device,backend", backend_params("token_logprobs"))
@pytest.mark.parametrize("name", FUSED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_vs_composed(device, backend, name, dtype):
    """fastpo.policy_loss on new features = token_logprobs -> policy_loss_from_logprobs, on every
    backend (triton under the interpreter on CPU: tiny shapes), values and gradients."""
    cfg = CASES[name]
    b, t, v = 2, 3, 37  # odd vocabulary; a masked token via ignore_index
    logits = make_logits((b, t, v), dtype, device, seed=3)
    labels = make_labels((b, t), v, device, ignore_frac=0.0, seed=4)
    labels[1, 2] = -100
    g = torch.Generator().manual_seed(5)
    old = (torch.randn(b, t, generator=g) * 0.3 - math.log(v)).to(device)
    ref = old + 0.2 * torch.randn(b, t, generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    w = (torch.rand(b, t, generator=g) + 0.5).to(device)
    roll = old + 0.1 * torch.randn(b, t, generator=g).to(device)
    kw = dict(ref_logprobs=ref, config=cfg, policy_weights=w, rollout_logprobs=roll)
    x = logits.clone().requires_grad_()
    out = fastpo.policy_loss(x, labels, old, adv, backend=backend, **kw)
    (gx,) = torch.autograd.grad(out.loss, x)
    y = logits.double().clone().requires_grad_()
    lp, ent = fastpo.token_logprobs(y, labels, temperature=cfg.temperature, return_entropy=True, backend="torch")
    want = policy_loss_from_logprobs(lp, old, adv, labels != -100, entropy=ent, **kw)
    (gy,) = torch.autograd.grad(want.loss, y)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out.loss, want.loss) < 1e-5
    assert rel_err(gx, gy) < tol
    assert not gx[1, 2].any()  # ignored label: exactly zero gradient
    assert not out.per_token_loss.requires_grad
    for k in out.metrics:
        torch.testing.assert_close(out.metrics[k], want.metrics[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("token_logprobs"))
def test_inplace_backward_on_a_new_variant(device, backend):
    logits = make_logits((2, 3, 29), torch.float32, device, seed=1)
    labels = make_labels((2, 3), 29, device, ignore_frac=0.0, seed=2)
    old = torch.full((2, 3), -3.3, device=device)
    adv = torch.tensor([1.0, -0.5], device=device)
    cfg = C(variant="sapo")
    x = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(fastpo.policy_loss(x, labels, old, adv, config=cfg, backend=backend).loss, x)
    y = logits.clone().requires_grad_()
    out = fastpo.policy_loss(y, labels, old, adv, config=cfg, backend=backend, inplace_backward=True)
    (got,) = torch.autograd.grad(out.loss, y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
