"""Presets verl and openrlhf: each library's policy loss re-derived here from its source (verl
compute_policy_loss_* + agg_loss + kl_penalty per loss mode, OpenRLHF PolicyLoss + actor
KL/entropy terms) and compared, values and gradients, in float64 and float32, with fastpo
driven by the preset's config and the documented call-time counts."""
import pytest
import torch

import fastpo
from fastpo import presets
from fastpo.functional.policy_loss import policy_loss_from_logprobs
from test_presets import B, T, _batch, _compare


# ----------------------------------------------------------------------------- verl
def _verl_kl(lp, ref, kl_type):
    base = kl_type.rstrip("+")
    if base in ("kl", "k1"):
        fwd = lp - ref
    elif base == "abs":
        fwd = (lp - ref).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (lp - ref).square()
    else:
        kl = torch.clamp(ref - lp, min=-20, max=20)
        fwd = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kl_type.endswith("+"):
        return fwd
    back = 0.5 * (lp - ref).square()
    return back - back.detach() + fwd.detach()


def _verl_agg(loss_mat, loss_mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
              loss_scale_factor=None):
    """verl agg_loss, recent form (global counts, fully masked sequences excluded)."""
    if mode == "token-mean":
        n = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * loss_mask).sum() / n * dp_size
    cnt = loss_mask.sum(-1)
    seq_mask = (cnt > 0).to(loss_mat.dtype)
    gbs = seq_mask.sum() if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * loss_mask).sum(-1) / (cnt + 1e-8)
        return (seq_losses * seq_mask).sum() / gbs * dp_size
    loss = ((loss_mat * loss_mask).sum(-1) * seq_mask).sum() / gbs * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _verl_actor_loss(lp, old, adv, mask, ref, ent, *, lo, hi, c, mode, kl_type=None, kl_coef=0.0, ent_coeff=0.0, **agg):
    """dp_actor: compute_policy_loss_vanilla - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl)."""
    m = mask.to(lp.dtype)
    neg_kl = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - lo, 1 + hi)
    cpl1 = torch.maximum(pg1, pg2)
    cpl2 = torch.min(-adv * c, cpl1)
    pg_losses = torch.where(adv < 0, cpl2, cpl1)
    loss = _verl_agg(pg_losses, m, mode, **agg)
    if ent_coeff != 0:
        loss = loss - ent_coeff * _verl_agg(ent, m, mode, **agg)
    if kl_type is not None:
        loss = loss + kl_coef * _verl_agg(_verl_kl(lp, ref, kl_type), m, mode, **agg)
    return loss


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize(
    "kl_type,extra",
    [
        (None, dict(clip_ratio_c=3.0)),  # vanilla: dual-clip is always on in verl
        ("low_var_kl", dict(clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coeff=1e-3)),
        ("k3+", dict(clip_ratio_c=1.5)),  # straight-through k3, dual-clip bound active
        ("kl", dict(clip_ratio=0.1)),
        ("mse", {}),
        ("abs", {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verl_vanilla(mode, kl_type, extra, dtype):
    lp, old, adv, mask, ref, ent = _batch(dtype, per_token_adv=True, seed=3)
    old = old - 0.8 * (adv < 0)  # ratios above clip_ratio_c where A < 0
    kl = dict(use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type=kl_type) if kl_type else {}
    cfg = presets.verl(loss_agg_mode=mode, **kl, **extra)
    # recent verl: seq-mean counts only non-empty sequences (the empty row is excluded)
    nonempty = int((mask.sum(-1) > 0).sum())
    ours = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg,
                                     num_sequences=nonempty).loss
    lp2 = lp.detach().clone().requires_grad_()
    ent2 = ent.detach().clone().requires_grad_()
    lo = extra.get("clip_ratio_low", extra.get("clip_ratio", 0.2))
    hi = extra.get("clip_ratio_high", extra.get("clip_ratio", 0.2))
    theirs = _verl_actor_loss(lp2, old, adv, mask, ref, ent2, lo=lo, hi=hi, c=extra.get("clip_ratio_c", 3.0),
                              mode=mode, kl_type=kl_type, kl_coef=0.05, ent_coeff=extra.get("entropy_coeff", 0.0))
    _compare(ours, theirs, [(lp, lp2), (ent, ent2)], dtype)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_data_parallel_counts(mode):
    # verl: local_sum / global_count * dp_size; fastpo: num_tokens / num_sequences = global / dp_size
    lp, old, adv, mask, ref, _ = _batch(per_token_adv=True)
    dp, glob_tokens, glob_seqs = 4, 4 * int(mask.sum()) + 3, 4 * B + 2
    cfg = presets.verl(loss_agg_mode=mode, loss_scale_factor=16)
    ours = policy_loss_from_logprobs(lp, old, adv, mask, config=cfg, num_tokens=glob_tokens / dp,
                                     num_sequences=glob_seqs / dp).loss
    lp2 = lp.detach().clone().requires_grad_()
    theirs = _verl_actor_loss(lp2, old, adv, mask, ref, None, lo=0.2, hi=0.2, c=3.0, mode=mode, dp_size=dp,
                              batch_num_tokens=glob_tokens, global_batch_size=glob_seqs, loss_scale_factor=16)
    _compare(ours, theirs, [(lp, lp2)], torch.float64)


def test_verl_token_sum_norm_divides_by_loss_scale_factor_only():
    # verl main reverted the sequence-count division: sum m L / loss_scale_factor (default T)
    lp, old, adv, mask, _, _ = _batch(per_token_adv=True)
    for lsf in (None, 16):
        cfg = presets.verl(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=lsf)
        ours = policy_loss_from_logprobs(lp, old, adv, mask, config=cfg, num_sequences=1).loss
        lp2 = lp.detach().clone().requires_grad_()
        ratio = torch.exp(torch.clamp(lp2 - old, -20, 20))
        cpl1 = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
        pg = torch.where(adv < 0, torch.min(-adv * 3.0, cpl1), cpl1)
        theirs = (pg * mask).sum(-1).sum() / (T if lsf is None else lsf)
        _compare(ours, theirs, [(lp, lp2)], torch.float64)


def _verl_mode_pg(mode, lp, old, adv, m, *, lo, hi, tau=(1.0, 1.05), is_w=None):
    """verl core_algos policy losses other than vanilla: (per-token loss, its forced agg or None);
    geo_mean returns its scalar directly."""
    if mode == "gspo":
        n = m.sum(-1).clamp(min=1)
        seq = ((lp - old) * m).sum(-1) / n
        log_s = torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0)
        s = torch.exp(log_s)
        pg = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - lo, 1 + hi))
        return pg if is_w is None else pg * is_w, "seq-mean-token-mean"
    if mode == "sapo":
        r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
        t = torch.where(adv > 0, torch.tensor(tau[0], dtype=lp.dtype), torch.tensor(tau[1], dtype=lp.dtype))
        pg = -torch.sigmoid(t * (r - 1.0)) * (4.0 / t) * adv
        return pg if is_w is None else pg * is_w, "seq-mean-token-mean"
    if mode == "cispo":
        r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
        pg = -torch.clamp(r, 1 - lo, 1 + hi).detach() * adv * lp
        return pg if is_w is None else pg * is_w, None
    if mode == "gpg":
        pg = -lp * adv
        return pg if is_w is None else pg * is_w, None
    # geo_mean
    nak = lp - old
    sgn = torch.sign(adv)
    nak_min = sgn * torch.min(sgn * nak, sgn * torch.clamp(nak, -lo, hi))
    cnt = m.sum(-1)
    ratio = torch.exp((nak_min * m).sum(-1) / (cnt + 1e-8))
    a = (adv * m).sum(-1) / (cnt + 1e-8)
    pg = -a * ratio
    if is_w is not None:
        pg = pg * torch.exp((torch.log(is_w + 1e-10) * m).sum(-1) / (cnt + 1e-8))
    return pg.mean(), "scalar"


@pytest.mark.parametrize("loss_mode", ["gspo", "sapo", "cispo", "gpg", "geo_mean"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("terms", ["none", "kl-entropy", "is-weights"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verl_loss_modes(loss_mode, mode, terms, dtype):
    # per-sequence advantages broadcast to tokens (verl's outcome estimators); one row with a
    # large log-ratio so verl's clamps (gspo's 10, sapo's 20) are active
    lp, old, adv, mask, ref, ent = _batch(dtype, seed=6, empty_row=False)
    adv = adv[:, None].expand(B, T).contiguous()
    old = old.clone()
    old[3] = old[3] - 12.0
    lo, hi = 0.2, 0.28
    kl = dict(use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="low_var_kl", entropy_coeff=1e-2) \
        if terms == "kl-entropy" else {}
    cfg = presets.verl(loss_mode=loss_mode, clip_ratio_low=lo, clip_ratio_high=hi, loss_agg_mode=mode, tau_pos=1.0,
                       tau_neg=1.05, **kl)
    is_w = None
    if terms == "is-weights":
        g = torch.Generator().manual_seed(3)
        roll = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
        is_w = fastpo.rollout_is_weights(old, roll, mask, high=2.0)
    nonempty = int((mask.sum(-1) > 0).sum())
    call = {} if loss_mode == "geo_mean" else dict(num_sequences=nonempty)
    ours = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg,
                                     policy_weights=is_w, **call).loss
    lp2, ent2 = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    m = mask.to(dtype)
    pg, forced = _verl_mode_pg(loss_mode, lp2, old, adv, m, lo=lo, hi=hi, is_w=is_w)
    theirs = pg if forced == "scalar" else _verl_agg(pg, m, forced or mode)
    if kl:
        theirs = theirs - 1e-2 * _verl_agg(ent2, m, mode) + 0.05 * _verl_agg(_verl_kl(lp2, ref, "low_var_kl"), m, mode)
    _compare(ours, theirs, [(lp, lp2), (ent, ent2)], dtype, rtol64=1e-6)  # verl: n + 1e-8


# ----------------------------------------------------------------------------- OpenRLHF
def _masked_mean(x, m, dim=None):
    return (x * m).sum(dim=dim) / m.sum(dim=dim)


def _openrlhf_loss(lp, old, adv, mask, ref, ent, *, lo, hi, dual, token_level, ptype, kl_est=None, kl_coef=0.0,
                   ent_coef=0.0):
    m = mask.to(lp.dtype)
    if ptype == "ppo":
        ratio = (lp - old).clamp(min=-20.0, max=20.0).exp()
    else:  # differentiable through every token of the sequence
        ratio_seq = ((lp - old) * m).sum(-1) / m.sum(-1).clamp_min(1)
        ratio = ratio_seq.exp().unsqueeze(-1) * m
        token_level = False
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - lo, 1 + hi) * adv
    if dual is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(adv < 0, torch.max(clip1, dual * adv), clip1)
    loss = _masked_mean(loss, m) if token_level else _masked_mean(loss, m, -1).mean()
    if kl_est is not None:
        lr = lp - ref
        kl = {"k1": lr, "k2": lr**2 / 2.0, "k3": (-lr).exp() - 1 + lr}[kl_est].clamp(min=-10, max=10)
        loss = loss + _masked_mean(kl, m) * kl_coef
    if ent_coef:
        loss = loss - _masked_mean(ent, m) * ent_coef
    return loss


@pytest.mark.parametrize(
    "opts",
    [
        dict(),  # defaults: symmetric 0.2, token-level
        dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0),
        dict(token_level_loss=False, dual_clip=2.0),
        dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
        dict(policy_loss_type="gspo", dual_clip=1.5),
        dict(use_kl_loss=True, init_kl_coef=0.01, kl_estimator="k3", entropy_loss_coef=1e-3),
        dict(use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k2"),
        dict(use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k1", dual_clip=3.0),
        dict(token_level_loss=False, use_kl_loss=True, init_kl_coef=0.05, kl_estimator="k3", entropy_loss_coef=1e-2),
        dict(policy_loss_type="gspo", use_kl_loss=True, init_kl_coef=0.05, kl_estimator="k2", entropy_loss_coef=1e-2),
        dict(extreme=True),  # |logp - old| > 20: OpenRLHF's clamp
        dict(policy_loss_type="gspo", per_token_adv=True),  # KL-in-reward: advantages vary per token
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_openrlhf(opts, dtype):
    # advantages constant per sequence (GRPO / REINFORCE++ style), broadcast to [B, T] as OpenRLHF
    # does, unless per_token_adv; OpenRLHF's seq-mean counts non-empty sequences (global_batch_size)
    opts = dict(opts)
    extreme, per_token = opts.pop("extreme", False), opts.pop("per_token_adv", False)
    lp, old, adv, mask, ref, ent = _batch(dtype, empty_row=False, seed=4, per_token_adv=per_token)
    adv_bt = adv if per_token else adv[:, None].expand(B, T)
    old = old - 0.6 * (adv_bt < 0)
    if extreme:
        old = old.clone()
        old[0, :3] = old[0, :3] + torch.tensor([30.0, -25.0, 21.0], dtype=dtype)
    cfg = presets.openrlhf(**opts)
    ours = policy_loss_from_logprobs(lp, old, adv_bt, mask, ref_logprobs=ref, entropy=ent, config=cfg).loss
    assert torch.isfinite(ours)
    lp2 = lp.detach().clone().requires_grad_()
    ent2 = ent.detach().clone().requires_grad_()
    theirs = _openrlhf_loss(
        lp2, old, adv_bt, mask, ref, ent2, lo=opts.get("clip_eps_low", 0.2), hi=opts.get("clip_eps_high", 0.2),
        dual=opts.get("dual_clip"), token_level=opts.get("token_level_loss", True),
        ptype=opts.get("policy_loss_type", "ppo"), kl_est=opts.get("kl_estimator") if opts.get("use_kl_loss") else None,
        kl_coef=opts.get("init_kl_coef", 0.0), ent_coef=opts.get("entropy_loss_coef") or 0.0,
    )
    _compare(ours, theirs, [(lp, lp2), (ent, ent2)], dtype)
