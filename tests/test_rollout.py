"""Rollout and advantage helpers against independent float64 formulas written here from each
library's source (TRL 1.16 GRPO/RLOO advantages and vLLM IS ratios, verl rollout_corr_helper and
core_algos estimators, OpenRLHF PolicyLoss IS correction, compute_reward, advantage whitening):
rollout_is_weights, rollout_rejection_mask, group_advantages, passk_advantages,
discounted_returns, token_rewards, whiten(unbiased=False). Masks, NaN, odd shapes."""
import math

import pytest
import torch

import fastpo

B, T = 4, 5
LENGTHS = [5, 2, 0, 3]


def _pair(dtype=torch.float64, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 2.0).to(dtype)
    roll = (old.double() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    return old, roll, mask


# ----------------------------------------------------------------------------- IS weights
def _is_oracle(old, roll, mask, level, mode, low, high, log_clamp, normalize):
    out = torch.zeros(B, T, dtype=torch.float64)
    lr = [[0.0 if math.isnan(x) else x for x in row] for row in (old.double() - roll.double()).tolist()]
    seq_w = []
    for i in range(B):
        idx = range(LENGTHS[i])
        for t in idx:
            if level == "token":
                lw = lr[i][t]
            elif level == "sequence":
                lw = sum(lr[i][u] for u in idx)
            else:
                lw = sum(lr[i][u] for u in idx) / LENGTHS[i]
            if log_clamp is not None:
                lw = min(max(lw, -log_clamp), log_clamp)
            w = math.exp(lw)
            if mode == "truncate":
                w = min(w, high) if high is not None else w
                w = max(w, low) if low is not None else w
            elif (low is not None and w < low) or (high is not None and w > high):
                w = 0.0
            out[i, t] = w
        if LENGTHS[i]:
            seq_w.append(out[i, 0].item())
    if normalize:
        mean = out.sum() / sum(LENGTHS) if level == "token" else sum(seq_w) / len(seq_w)
        if mean > 1e-8:
            out = out / mean
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode,low,high", [("truncate", None, 2.0), ("truncate", 0.5, 1.5), ("mask", 0.8, 1.25),
                                           ("mask", None, 3.0), ("truncate", None, None)])
@pytest.mark.parametrize("log_clamp,normalize", [(20.0, False), (None, False), (0.1, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rollout_is_weights(level, mode, low, high, log_clamp, normalize, dtype):
    old, roll, mask = _pair(dtype)
    roll = roll.clone()
    roll[0, 2] = float("nan")  # unscorable token: ratio 1 (TRL)
    roll[1, 4] = float("inf")  # garbage at a masked position never enters
    got = fastpo.rollout_is_weights(old, roll, mask, level=level, mode=mode, low=low, high=high,
                                    log_clamp=log_clamp, batch_normalize=normalize)
    want = _is_oracle(old, roll, mask, level, mode, low, high, log_clamp, normalize)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    assert not got[~mask].any() and not got.requires_grad


def test_rollout_is_weights_match_library_formulas():
    old, roll, mask = _pair(torch.float32, seed=3)
    m = mask.float()
    # TRL token_mask with clip_max 3 (vllm_importance_sampling_mode default is sequence_mask)
    diff = torch.nan_to_num((old - roll) * m, nan=0.0)
    seq = torch.exp(diff.sum(-1, keepdim=True))
    trl = seq.masked_fill(seq > 3.0, 0.0)
    ours = fastpo.rollout_is_weights(old, roll, mask, level="sequence", mode="mask", high=3.0, log_clamp=None)
    torch.testing.assert_close(ours, (trl * m).expand(B, T) * m)
    # verl token TIS, threshold 2, batch-normalised
    w = torch.exp(torch.clamp(old - roll, -20, 20)) * m
    w = w.clamp(max=2.0)
    w = w / ((w * m).sum() / (m.sum() + 1e-8))
    ours = fastpo.rollout_is_weights(old, roll, mask, high=2.0, batch_normalize=True)
    torch.testing.assert_close(ours, w * m, rtol=1e-6, atol=1e-7)
    # OpenRLHF seq-mask-tis (geometric-mean filter, unclamped token ratios)
    lo, hi = 0.9, 1.1
    geo = torch.exp((( old - roll) * m).sum(-1) / m.sum(-1).clamp(min=1))
    keep = (geo >= lo) & (geo <= hi)
    orl = keep[:, None] * torch.exp(old - roll)
    ours = fastpo.rollout_is_weights(old, roll, mask, high=None, log_clamp=None) * (
        fastpo.rollout_is_weights(old, roll, mask, level="geometric", mode="mask", low=lo, high=hi) > 0)
    torch.testing.assert_close(ours, orl * m)


# ----------------------------------------------------------------------------- rejection
def _stats(old, roll):
    lr = (old.double() - roll.double()).clamp(-20, 20)
    return {"k1": -lr, "k2": 0.5 * lr**2, "k3": lr.exp() - 1 - lr}


@pytest.mark.parametrize(
    "criteria,thresholds",
    [
        ("token_k1", 1.3), ("token_k1", "0.7_1.2"), ("token_k2", 0.05), ("token_k3", 0.04),
        ("seq_sum_k1", (0.5, 1.5)), ("seq_sum_k2", 0.2), ("seq_mean_k3", 0.03), ("seq_mean_k1", 1.1),
        ("seq_max_k2", 0.1), ("seq_max_k3", 0.08), ("token_k1,seq_mean_k2", "0.6_1.6,0.05"),
        (["token_k2", "seq_max_k3"], [0.2, 0.1]),
    ],
)
def test_rollout_rejection_mask(criteria, thresholds):
    old, roll, mask = _pair(seed=1)
    got = fastpo.rollout_rejection_mask(old, roll, mask, criteria, thresholds)
    names = criteria.split(",") if isinstance(criteria, str) else criteria
    if isinstance(thresholds, str):
        specs = thresholds.split(",")
    elif isinstance(thresholds, list):
        specs = thresholds
    else:
        specs = [thresholds] * len(names)
    st = _stats(old, roll)
    want = mask.clone()
    for name, spec in zip(names, specs):
        kind = name[-2:]
        if isinstance(spec, str) and "_" in spec:
            lo, hi = map(float, spec.split("_"))
        elif isinstance(spec, tuple):
            lo, hi = spec
        else:
            hi = float(spec)
            lo = 1.0 / hi
        for i in range(B):
            vals = [st[kind][i, t].item() for t in range(LENGTHS[i])]
            if name.startswith("token"):
                per = vals
            else:
                agg = {"seq_sum": sum(vals), "seq_mean": sum(vals) / max(1, len(vals)),
                       "seq_max": max(vals) if vals else 0.0}[name.rsplit("_", 1)[0]]
                per = [agg] * len(vals)
            for t, v in enumerate(per):
                ok = math.log(lo) <= v <= math.log(hi) if kind == "k1" else v <= hi
                want[i, t] = want[i, t] and ok
    assert torch.equal(got, want)
    assert not got[~mask].any()


def test_rollout_rejection_nan_rejects():
    old, roll, mask = _pair()
    roll = roll.clone()
    roll[0, 1] = float("nan")
    tok = fastpo.rollout_rejection_mask(old, roll, mask, "token_k2", 100.0)
    assert not tok[0, 1] and tok[0, 0]
    seq = fastpo.rollout_rejection_mask(old, roll, mask, "seq_mean_k2", 100.0)
    assert not seq[0].any() and seq[1, :2].all()


@pytest.mark.parametrize("criteria,thresholds,match", [("token_k4", 1.0, "unknown"), ("seq_max_k1", 1.0, "unknown"),
                                                       ("token_k2", "0.1_0.2", "single"), ("token_k2", -1.0, "positive"),
                                                       ("token_k2,token_k3", [1.0, 2.0, 3.0], "one per")])
def test_rollout_rejection_bad(criteria, thresholds, match):
    old, roll, mask = _pair()
    with pytest.raises(ValueError, match=match):
        fastpo.rollout_rejection_mask(old, roll, mask, criteria, thresholds)


# ----------------------------------------------------------------------------- group advantages
def _groups(rewards, size):
    return [list(range(s, s + size)) for s in range(0, len(rewards), size)]


def _group_oracle(r, size, baseline, scale, eps, singleton, weights=None):
    r = [float(x) for x in r]
    out = [0.0] * len(r)
    fin = [i for i, x in enumerate(r) if not math.isnan(x)]
    bstd = None
    if len(fin) > 1:
        mu = sum(r[i] for i in fin) / len(fin)
        bstd = math.sqrt(sum((r[i] - mu) ** 2 for i in fin) / (len(fin) - 1))
    for grp in _groups(r, size):
        g = [i for i in grp if not math.isnan(r[i])]
        w = {i: 1.0 if weights is None else float(weights[i]) for i in g}
        for i in g:
            if len(g) <= 1:
                if singleton == "zero":
                    continue
                b, std = 0.0, 1.0
            else:
                if baseline == "mean":
                    b = sum(w[j] * r[j] for j in g) / sum(w[j] for j in g)
                elif baseline == "loo":
                    b = sum(w[j] * r[j] for j in g if j != i) / sum(w[j] for j in g if j != i)
                else:
                    b = 0.0
                mu = sum(r[j] for j in g) / len(g)
                std = math.sqrt(sum((r[j] - mu) ** 2 for j in g) / (len(g) - 1))
            a = r[i] - b
            if scale == "group":
                a = a / (std + eps)
            elif scale == "batch":
                a = a / (bstd + eps) if bstd is not None else 0.0
            out[i] = a
    return torch.tensor(out, dtype=torch.float64)


REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, float("nan"), 2.0, 2.0, 2.0, 3.0, float("nan"), float("nan"), -1.0],
                       dtype=torch.float64)  # groups of 3: plain, one NaN, constant, one finite


@pytest.mark.parametrize("baseline", ["mean", "loo", "none"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("singleton", ["zero", "reward"])
@pytest.mark.parametrize("weighted", [False, True])
def test_group_advantages(baseline, scale, singleton, weighted):
    weights = torch.arange(1, 13, dtype=torch.float64) if weighted else None
    got = fastpo.group_advantages(REWARDS, 3, baseline=baseline, scale=scale, singleton=singleton,
                                  baseline_weights=weights)
    want = _group_oracle(REWARDS, 3, baseline, scale, 1e-6, singleton, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the same groups given as arbitrary labels, shuffled
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([7, 7, 7, 2, 2, 2, 9, 9, 9, -1, -1, -1])[perm]
    shuffled = fastpo.group_advantages(REWARDS[perm], group_ids=ids, baseline=baseline, scale=scale,
                                       singleton=singleton, baseline_weights=None if weights is None else weights[perm])
    torch.testing.assert_close(shuffled, want[perm], rtol=1e-12, atol=1e-12)


def test_group_advantages_match_trl_and_verl():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 3, (16,), generator=g).float()
    # TRL GRPO: (r - group nanmean) / (group nanstd + 1e-4)
    grouped = r.view(-1, 4)
    trl = (r - grouped.mean(1).repeat_interleave(4)) / (grouped.std(1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(fastpo.group_advantages(r, 4, eps=1e-4), trl)
    # TRL RLOO: r - (sum - r) / (n - 1)
    rloo = r - (grouped.sum(1, keepdim=True) - grouped).view(-1) / 3
    torch.testing.assert_close(fastpo.group_advantages(r, 4, baseline="loo", scale="none"), rloo)
    # verl RLOO: r * n / (n - 1) - mean * n / (n - 1)
    verl = r * 4 / 3 - grouped.mean(1).repeat_interleave(4) * 4 / 3
    torch.testing.assert_close(fastpo.group_advantages(r, 4, baseline="loo", scale="none", singleton="reward"), verl)
    assert fastpo.group_advantages(r, 4).dtype == torch.float32


def test_passk_advantages():
    r = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 0.0, float("nan"), 2.0, float("nan"), 3.0, -1.0, 2.0],
                     dtype=torch.float64)
    got = fastpo.passk_advantages(r, 3)
    want = torch.zeros(12, dtype=torch.float64)
    want[1] = 0.5 / (torch.tensor([0.0, 1.0, 0.5]).double().std() + 1e-6)  # best minus second best
    # group 2: tie at the top -> 0; group 3: one finite -> 0
    want[9] = 1.0 / (torch.tensor([3.0, -1.0, 2.0]).double().std() + 1e-6)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fastpo.passk_advantages(r, 3, scale="none")[[1, 9]],
                               torch.tensor([0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="group_size"):
        fastpo.passk_advantages(r, 1)


# ----------------------------------------------------------------------------- returns, rewards, whiten
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns(gamma):
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = fastpo.discounted_returns(r, mask, gamma=gamma)
    reset = fastpo.discounted_returns(r, mask, gamma=gamma, reset_at_masked=True)
    want = torch.zeros(3, 6, dtype=torch.float64)
    want_reset = torch.zeros(3, 6, dtype=torch.float64)
    for i in range(3):
        kept = [t for t in range(6) if mask[i, t]]
        for j, t in enumerate(kept):  # transparent: discount over kept positions only
            want[i, t] = sum(gamma**k * r[i, u] for k, u in enumerate(kept[j:]))
        run = 0.0
        for t in reversed(range(6)):  # verl's REINFORCE++ loop on masked rewards
            run = r[i, t] * mask[i, t] + gamma * run
            if mask[i, t]:
                want_reset[i, t] = run
            run = run * mask[i, t]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(reset, want_reset)
    # right-padded row: OpenRLHF's get_cumulative_returns, any gamma
    run, orl = 0.0, []
    for t in reversed(range(6)):
        run = r[0, t] * mask[0, t] + gamma * run
        orl.append(run)
    torch.testing.assert_close(got[0, :4], torch.stack(orl[::-1])[:4])


def test_token_rewards():
    scores = torch.tensor([1.0, -2.0, 3.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    kl = torch.arange(12, dtype=torch.float32).view(3, 4)
    got = fastpo.token_rewards(scores, mask, kl=kl, kl_coef=0.1)
    eos = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)  # OpenRLHF compute_reward
    want = torch.zeros_like(kl).scatter_(1, eos, scores[:, None]) - 0.1 * kl
    want = want * mask
    torch.testing.assert_close(got, want)
    assert not got[2].any()
    with pytest.raises(ValueError, match="needs kl"):
        fastpo.token_rewards(scores, mask, kl_coef=0.1)


def test_whiten_population_variance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    got = fastpo.whiten(x, mask, unbiased=False, eps=0.0)
    m = mask.double()
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum()
    want = (x - mean) * var.rsqrt() * m  # OpenRLHF's normalisation (its clamp(min=1e-8) inactive here)
    torch.testing.assert_close(got, want)
    ga, = torch.autograd.grad(got.sum() + (got**2).sum(), x)
    gb, = torch.autograd.grad(want.sum() + (want**2).sum(), x)
    torch.testing.assert_close(ga, gb)
    biased = fastpo.whiten(x, mask, eps=0.0)
    torch.testing.assert_close(biased, want * math.sqrt(7 / 8))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fastpo.group_advantages(torch.ones(5), 2), "split"),
        (lambda: fastpo.group_advantages(torch.ones(4)), "exactly one"),
        (lambda: fastpo.group_advantages(torch.ones(4), 2, baseline="median"), "baseline"),
        (lambda: fastpo.group_advantages(torch.ones(4), 2, scale="std"), "scale"),
        (lambda: fastpo.group_advantages(torch.ones(4, 1), 2), r"\[B\]"),
        (lambda: fastpo.group_advantages(torch.ones(4), group_ids=torch.ones(4)), "integer"),
        (lambda: fastpo.rollout_is_weights(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), level="seq"), "level"),
        (lambda: fastpo.rollout_is_weights(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), high=0.0), "high"),
        (lambda: fastpo.rollout_is_weights(torch.ones(2, 3), torch.ones(2, 2), torch.ones(2, 3)), "rollout_logprobs"),
        (lambda: fastpo.rollout_is_weights(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), low=2.0, high=1.0),
         "exceed"),
        (lambda: fastpo.discounted_returns(torch.ones(2, 3), torch.ones(2, 3), gamma=1.5), "gamma"),
    ],
)
def test_bad_helper_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
