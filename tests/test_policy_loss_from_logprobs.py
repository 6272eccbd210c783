"""policy_loss_from_logprobs: every PolicyLossConfig field against an independent oracle
transcribed from the papers (values and gradients, float64 and float32), masking, fully
masked rows, extreme log-ratios, normaliser overrides, metrics, the module, bad inputs."""
import dataclasses
import math

import pytest
import torch

from fastpo.config import METRIC_KEYS, PolicyLossConfig, PolicyLossOutput
from fastpo.functional.policy_loss import policy_loss_from_logprobs
from fastpo.modules.policy import PolicyLoss
from fastpo.reference.policy_loss import policy_loss_ref

B, T = 4, 7


def _batch(dtype=torch.float64, seed=0, adv_per_token=False, spread=0.6):
    """Ragged mask (lengths 7, 4, 0, 1: full row, padded row, fully masked row, T=1-like row)."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.5
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 3.0
    adv = torch.randn((B, T) if adv_per_token else (B,), generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 0, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(lp).requires_grad_(), cast(old), cast(adv), mask, cast(ref), cast(ent).requires_grad_()


def _k3(lp, ref):
    return torch.exp(ref - lp) - (ref - lp) - 1.0


def _oracle(lp, old, adv, mask, ref, ent, cfg, num_tokens=None, num_sequences=None):
    """Independent float64 transcription (min-of-surrogates form, per-sequence loops)."""
    m = mask.double()
    a = adv.double() if adv.dim() == 2 else adv.double()[:, None].expand(B, T)
    lp, old = lp.double(), old.double()
    lr = lp - old
    if cfg.logratio_clamp is not None:
        lr = lr.clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    if cfg.variant == "gspo":  # GSPO eq. (10): s_it = sg[s_i] * pi / sg[pi]
        s = torch.stack([(lr[i] * m[i]).sum() / max(1.0, m[i].sum().item()) for i in range(B)]).exp()
        r = s.detach()[:, None] * torch.exp(lp - lp.detach())
    else:
        r = lr.exp()
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    if cfg.variant == "cispo":
        L = -torch.clamp(r, lo, hi).detach() * a * lp
    else:
        r1 = r if cfg.ratio_cap is None else torch.clamp(r, max=cfg.ratio_cap)
        L = -torch.min(r1 * a, torch.clamp(r, lo, hi) * a)
        if cfg.dual_clip is not None:
            L = torch.where(a < 0, torch.min(L, -cfg.dual_clip * a), L)
    if cfg.kl_coef:
        d = lp - ref.double()
        base = cfg.kl_estimator.rstrip("+")
        kl = {"k1": d, "k2": 0.5 * d * d, "k3": _k3(lp, ref.double()), "abs": d.abs()}[base]
        if cfg.kl_clamp is not None:
            kl = kl.clamp(-cfg.kl_clamp, cfg.kl_clamp)
        if cfg.kl_estimator.endswith("+"):
            kl = 0.5 * d * d - (0.5 * d * d).detach() + kl.detach()
        L = L + cfg.kl_coef * kl
    if cfg.entropy_coef:
        L = L - cfg.entropy_coef * ent.double()
    L = L * m
    S = B if num_sequences is None else num_sequences
    if cfg.agg == "token-mean":
        loss = L.sum() / (max(1.0, m.sum().item()) if num_tokens is None else num_tokens)
    elif cfg.agg == "seq-mean-token-mean":
        loss = sum(L[i].sum() / max(1.0, m[i].sum().item()) for i in range(B)) / S
    elif cfg.agg == "seq-mean-token-sum":
        loss = sum(L[i].sum() for i in range(B)) / S
    else:
        loss = L.sum() / (S * (T if cfg.agg_scale is None else cfg.agg_scale))
    return loss, L


# Each case isolates one config field (or a documented interaction) against the oracle.
CASES = {
    "default": {},
    "clip_higher": dict(clip_low=0.1, clip_high=0.28),  # DAPO asymmetric clipping
    "one_sided": dict(clip_high=math.inf),  # no upper clip
    "dual_clip": dict(dual_clip=2.0),  # active: spread gives ratios > 2 with A < 0
    "ratio_cap": dict(ratio_cap=1.3),  # TRL delta, below some ratios
    "logratio_clamp": dict(logratio_clamp=0.4),  # active on many tokens
    "kl_k1": dict(kl_coef=0.1, kl_estimator="k1"),
    "kl_k2": dict(kl_coef=0.1, kl_estimator="k2"),
    "kl_k3": dict(kl_coef=0.1, kl_estimator="k3"),
    "kl_abs": dict(kl_coef=0.1, kl_estimator="abs"),
    "kl_k3_plus": dict(kl_coef=0.1, kl_estimator="k3+"),
    "kl_clamp": dict(kl_coef=0.1, kl_estimator="k3", kl_clamp=0.05),  # clamp active
    "entropy_bonus": dict(entropy_coef=0.01),
    "entropy_penalty": dict(entropy_coef=-0.02),
    "temperature_ignored": dict(temperature=0.7),  # log-probs already at temperature
    "gspo": dict(variant="gspo"),
    "gspo_dual_cap": dict(variant="gspo", clip_low=3e-4, clip_high=4e-4, dual_clip=1.5, ratio_cap=1.2),
    "cispo": dict(variant="cispo", clip_low=1.0, clip_high=1.0),
    "cispo_two_sided": dict(variant="cispo", clip_low=0.3, clip_high=0.5),
    "seq_mean_token_mean": dict(agg="seq-mean-token-mean"),
    "seq_mean_token_sum": dict(agg="seq-mean-token-sum"),
    "token_sum_norm_T": dict(agg="seq-mean-token-sum-norm"),
    "token_sum_norm_scale": dict(agg="seq-mean-token-sum-norm", agg_scale=16.0),
    "everything": dict(
        clip_low=0.15, clip_high=0.3, dual_clip=2.5, ratio_cap=2.0, logratio_clamp=1.0, kl_coef=0.05,
        kl_estimator="k3+", kl_clamp=1.0, entropy_coef=1e-3, agg="seq-mean-token-mean",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
# float64: must match the oracle to rounding; float32: DESIGN's fp32-vs-float64 tolerance
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# per-sequence advantages (GRPO) and per-token ones (GAE)
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_matches_oracle(case, dtype, adv_per_token):
    cfg = PolicyLossConfig(**CASES[case])
    lp, old, adv, mask, ref, ent = _batch(dtype, adv_per_token=adv_per_token)
    out = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg)
    lp64 = lp.detach().double().requires_grad_()
    ent64 = ent.detach().double().requires_grad_()
    want, want_tok = _oracle(lp64, old, adv, mask, ref, ent64, cfg)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == acc and out.per_token_loss.dtype == acc and out.loss.dim() == 0
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), want.detach(), **tol)
    torch.testing.assert_close(out.per_token_loss.double(), want_tok.detach(), **tol)
    # gradient of the loss, and of the per-token loss under a random upstream gradient
    g = torch.autograd.grad(out.loss, (lp, ent), allow_unused=True, retain_graph=True)
    w = torch.autograd.grad(want, (lp64, ent64), allow_unused=True, retain_graph=True)
    for got, exp in zip(g, w):
        if exp is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got.double(), exp, **tol)
    up = torch.randn(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g_tok,) = torch.autograd.grad(out.per_token_loss, lp, up.to(acc))
    (w_tok,) = torch.autograd.grad(want_tok, lp64, up)
    torch.testing.assert_close(g_tok.double(), w_tok, **tol)


@pytest.mark.parametrize("case", ["default", "gspo", "cispo", "everything", "kl_abs"])
def test_public_equals_reference(case):
    cfg = PolicyLossConfig(**CASES[case])
    lp, old, adv, mask, ref, ent = _batch(torch.float32)
    out = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg)
    loss, per_tok, metrics = policy_loss_ref(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg)
    assert torch.equal(out.loss, loss) and torch.equal(out.per_token_loss, per_tok)
    assert all(torch.equal(out.metrics[k], metrics[k]) for k in METRIC_KEYS)


@pytest.mark.parametrize("variant", ["ppo", "gspo", "cispo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_masked_positions_zero_loss_and_gradient(variant, agg):
    # garbage (inf/NaN) at masked positions must not reach the loss or any gradient
    cfg = PolicyLossConfig(variant=variant, agg=agg, kl_coef=0.1, entropy_coef=0.01)
    lp, old, adv, mask, ref, ent = _batch(torch.float32, adv_per_token=True)
    junk = torch.tensor([math.nan, math.inf, -math.inf])
    fill = junk.repeat((~mask).sum().item() // 3 + 1)[: (~mask).sum().item()]
    lp, ent = lp.detach().clone(), ent.detach().clone()
    for x in (lp, old, adv, ref, ent):
        x[~mask] = fill
    lp.requires_grad_(), ent.requires_grad_()
    out = policy_loss_from_logprobs(lp, old, adv, mask.float(), ref_logprobs=ref, entropy=ent, config=cfg)
    assert torch.isfinite(out.loss)
    assert torch.equal(out.per_token_loss[~mask], torch.zeros((~mask).sum().item()))
    g_lp, g_ent = torch.autograd.grad(out.loss, (lp, ent))
    assert torch.equal(g_lp[~mask], torch.zeros_like(g_lp[~mask]))
    assert torch.equal(g_ent[~mask], torch.zeros_like(g_ent[~mask]))
    assert torch.isfinite(g_lp).all() and all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_fully_masked_sequence_contributes_zero_but_counts(agg):
    # chosen behaviour: an all-masked row adds 0 to the loss and still counts in S (= B)
    cfg = PolicyLossConfig(agg=agg)
    lp, old, adv, mask, _, _ = _batch()
    assert not mask[2].any()
    full = policy_loss_from_logprobs(lp, old, adv, mask, config=cfg).loss
    keep = [0, 1, 3]
    part = policy_loss_from_logprobs(lp[keep], old[keep], adv[keep], mask[keep], config=cfg, num_sequences=B)
    torch.testing.assert_close(full, part.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["ppo", "gspo", "cispo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_all_masked_batch(variant, agg):
    lp, old, adv, mask, ref, ent = _batch()
    cfg = PolicyLossConfig(variant=variant, agg=agg, kl_coef=0.1, entropy_coef=0.1)
    none = torch.zeros_like(mask)
    out = policy_loss_from_logprobs(lp, old, adv, none, ref_logprobs=ref, entropy=ent, config=cfg)
    assert out.loss.item() == 0.0 and not out.per_token_loss.any()
    (g,) = torch.autograd.grad(out.loss, lp)
    assert not g.any()
    assert all(v.item() == 0.0 for v in out.metrics.values())


@pytest.mark.parametrize("variant", ["ppo", "gspo", "cispo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_log_ratios_finite_with_clamps(variant, dtype):
    # |logp - old| and |logp - ref| up to 300: exp overflows without the clamps
    lp, old, adv, mask, ref, ent = _batch(torch.float64, adv_per_token=True)
    sign = torch.where(torch.arange(B * T).reshape(B, T) % 2 == 0, 1.0, -1.0).double()
    old = lp.detach() + 300.0 * sign
    ref = lp.detach() - 300.0 * sign
    lp = lp.detach().to(dtype).requires_grad_()
    cfg = PolicyLossConfig(
        variant=variant,
        logratio_clamp=20.0,
        kl_coef=0.1,
        kl_clamp=10.0,
        dual_clip=None if variant == "cispo" else 3.0,
    )
    out = policy_loss_from_logprobs(lp, old.to(dtype), adv.to(dtype), mask, ref_logprobs=ref.to(dtype), config=cfg)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all() and torch.isfinite(g).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_global_normalisers_make_micro_batches_add_up(agg):
    # gradient accumulation: per-micro-batch losses with the global counts sum to the full-batch loss
    cfg = PolicyLossConfig(agg=agg, kl_coef=0.05)
    lp, old, adv, mask, ref, _ = _batch()
    full = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, config=cfg).loss
    n_tok = mask.sum()  # a tensor, as produced by an all_reduce
    parts = [
        policy_loss_from_logprobs(
            lp[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], config=cfg, num_tokens=n_tok, num_sequences=B
        ).loss
        for s in (slice(0, 1), slice(1, 4))
    ]
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-12)
    g_full = torch.autograd.grad(full, lp, retain_graph=True)[0]
    g_parts = torch.autograd.grad(sum(parts), lp)[0]
    torch.testing.assert_close(g_parts, g_full, rtol=1e-12, atol=1e-12)


def test_num_tokens_and_num_sequences_scale_the_loss():
    lp, old, adv, mask, _, _ = _batch()
    base = policy_loss_from_logprobs(lp, old, adv, mask).loss
    scaled = policy_loss_from_logprobs(lp, old, adv, mask, num_tokens=100).loss
    torch.testing.assert_close(scaled, base * mask.sum() / 100)
    cfg = PolicyLossConfig(agg="seq-mean-token-sum")
    base = policy_loss_from_logprobs(lp, old, adv, mask, config=cfg).loss
    scaled = policy_loss_from_logprobs(lp, old, adv, mask, config=cfg, num_sequences=8.0).loss
    torch.testing.assert_close(scaled, base * B / 8)


def test_sequence_advantages_equal_broadcast_token_advantages():
    lp, old, adv, mask, _, _ = _batch()
    a = policy_loss_from_logprobs(lp, old, adv, mask, config=PolicyLossConfig(variant="gspo"))
    b = policy_loss_from_logprobs(lp, old, adv[:, None].expand(B, T), mask, config=PolicyLossConfig(variant="gspo"))
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize(
    "dtype,acc", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]
)
def test_dtypes(dtype, acc):
    lp, old, adv, mask, _, _ = _batch(dtype)
    out = policy_loss_from_logprobs(lp, old, adv, mask)
    assert out.loss.dtype == acc and out.per_token_loss.dtype == acc
    assert torch.autograd.grad(out.loss, lp)[0].dtype == dtype
    assert all(v.dtype == torch.float32 for v in out.metrics.values())


def test_metrics_hand_computed():
    # one sequence, four tokens: ratios 0.5, 1, 1.5, 4 with advantages -1, 1, 1, -1
    r = torch.tensor([[0.5, 1.0, 1.5, 4.0]], dtype=torch.float64)
    lp = torch.full((1, 4), -1.0, dtype=torch.float64, requires_grad=True)
    old = lp.detach() - r.log()
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    ref = lp.detach() - 0.5
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = PolicyLossConfig(dual_clip=3.0)
    out = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg)
    assert isinstance(out, PolicyLossOutput) and tuple(out.metrics) == METRIC_KEYS
    for v in out.metrics.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
    want = {
        "clip_frac_low": 0.25,  # token 0: A < 0, r = 0.5 < 0.8
        "clip_frac_high": 0.25,  # token 2: A > 0, r = 1.5 > 1.2
        "dual_clip_frac": 0.25,  # token 3: A < 0, clipped loss 4 > c = 3
        "ratio_mean": 1.75,
        "approx_kl": float((r - 1 - r.log()).mean()),
        "ref_kl": math.exp(-0.5) - 0.5,  # k3 with logp - ref = 0.5
        "entropy": 0.25,
    }
    for k, v in want.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-6), k
    # the loss values themselves: -min(rA, clip(r)A), then min(., 3) where A < 0
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[0.8, -1.0, -1.2, 3.0]], dtype=torch.float64))


def test_cispo_metrics_count_truncated_weights_regardless_of_sign():
    lp = torch.zeros(1, 3, dtype=torch.float64)
    old = -torch.tensor([[math.log(0.5), 0.0, math.log(3.0)]], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)[None]
    out = policy_loss_from_logprobs(lp, old, adv, torch.ones(1, 3), config=PolicyLossConfig(variant="cispo"))
    assert out.metrics["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert out.metrics["clip_frac_high"].item() == pytest.approx(1 / 3)


def test_module():
    lp, old, adv, mask, ref, ent = _batch()
    cfg = PolicyLossConfig(clip_high=0.28, kl_coef=0.1)
    mod = PolicyLoss(cfg)
    out = mod(lp, old, adv, mask, ref_logprobs=ref, num_tokens=9)
    want = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, config=cfg, num_tokens=9)
    assert torch.equal(out.loss, want.loss)
    assert PolicyLoss(clip_high=0.28, kl_coef=0.1).config == cfg
    assert PolicyLoss(PolicyLossConfig(), clip_high=0.28, kl_coef=0.1).config == cfg
    assert "clip_high=0.28" in repr(mod) and not list(mod.parameters())
    with pytest.raises(TypeError):
        PolicyLoss({"clip_high": 0.28})
    with pytest.raises(ValueError, match="unknown agg"):
        PolicyLoss(agg="mean")


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(variant="grpo"), "unknown variant"),
        (dict(agg="sum"), "unknown agg"),
        (dict(kl_estimator="k5"), "unknown kl_estimator"),
        (dict(clip_low=-0.1), "clip_low"),
        (dict(clip_high=math.nan), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(ratio_cap=0.0), "ratio_cap"),
        (dict(logratio_clamp=-1.0), "logratio_clamp"),
        (dict(kl_clamp=0.0), "kl_clamp"),
        (dict(kl_coef=-0.1), "kl_coef"),
        (dict(entropy_coef=math.inf), "entropy_coef"),
        (dict(temperature=0.0), "temperature"),
        (dict(agg_scale=0), "agg_scale"),
        (dict(clip_low="wide"), "clip_low"),
        (dict(variant="cispo", dual_clip=3.0), "cispo"),
        (dict(variant="cispo", ratio_cap=2.0), "cispo"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**fields)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PolicyLossConfig().clip_low = 0.3


def _call(**over):
    lp, old, adv, mask, ref, ent = _batch(torch.float32)
    args = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    kwargs = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return policy_loss_from_logprobs(args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"], **kwargs)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(logprobs=torch.zeros(B * T)), r"shape \[B, T\]"),
        (dict(logprobs=torch.zeros(B, T, 2)), r"shape \[B, T\]"),
        (dict(logprobs=torch.zeros(0, T)), "non-empty"),
        (dict(old_logprobs=torch.zeros(B, T + 1)), "old_logprobs must have shape"),
        (dict(mask=torch.ones(B, T - 1)), "mask must have shape"),
        (dict(advantages=torch.zeros(T)), "advantages must have shape"),
        (dict(advantages=torch.zeros(B, T + 1)), "advantages must have shape"),
        (dict(logprobs=torch.zeros(B, T, dtype=torch.long)), "floating-point"),
        (dict(advantages=torch.zeros(B, dtype=torch.long)), "floating-point"),
        (dict(mask=torch.ones(B, T, dtype=torch.complex64)), "mask must be"),
        (dict(ref_logprobs=torch.zeros(B, 1)), "ref_logprobs must have shape"),
        (dict(config=PolicyLossConfig(kl_coef=0.1)), "needs ref_logprobs"),
        (dict(config=PolicyLossConfig(entropy_coef=0.1)), "needs entropy"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(num_tokens=math.nan), "num_tokens"),
        (dict(num_tokens=True), "num_tokens"),
        (dict(num_sequences=-2), "num_sequences"),
        (dict(num_sequences=torch.ones(2)), "num_sequences"),
    ],
)
def test_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_bad_types():
    with pytest.raises(TypeError, match="config"):
        _call(config={"clip_low": 0.2})
    with pytest.raises(TypeError, match="logprobs"):
        _call(logprobs=[[0.0] * T] * B)
