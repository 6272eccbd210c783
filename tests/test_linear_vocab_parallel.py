"""Vocabulary-parallel linear ops (``process_group=`` on ``linear_*``) over gloo on CPU.

One spawned run per world size does every check (process start-up dominates the cost): 2 ranks
with head shards 10 / 27 and 3 ranks with 5 / 13 / 19 of V = 37 (uneven), H = 8. Every worker
builds the same hidden states and full head from a seed, keeps its rows of the head (weight
``[V_r, H]``, bias ``[V_r]``) and compares, in float64 (tight) and float32 (against the float64
oracle), its outputs, the FULL dL/dhidden (all-reduced inside the op, so identical on every
rank) and its slice of dL/dweight / dL/dbias with the float64 composition on the materialised
logits (``cap(h @ W.T + b) * logit_scale / T`` through the reference / ``backend="torch"``
logits-level ops) and with the unsharded linear op. Covered: ignored rows, temperature,
logit_scale, softcap, bias / no bias, several chunks, entropy gradient, sequence log-probs,
policy loss (ppo + k3 KL + entropy + policy_weights, the fused-eligible config; gspo), DPO, the
collectives per call and the bad-input errors. The spawn harness is ``test_vocab_parallel``'s.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastpo
from fastpo import PolicyLossConfig
from fastpo.reference import token_logprobs_ref

from test_vocab_parallel import _init, _launch, _rel, _same_on_all_ranks  # the shared spawn harness

V, H = 37, 8
SPLITS = {2: (10, 27), 3: (5, 13, 19)}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = (torch.float64, torch.float32)


# ----------------------------------------------------------------------------- data
def _close(actual, expected, dtype, what):
    err = _rel(actual, expected)
    assert err <= TOL[dtype], f"{what} ({dtype}): rel err {err:.3g} > {TOL[dtype]}"


def _head(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6,
            torch.randn(V, generator=g, dtype=torch.float64) * 0.5)


def _hidden(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, H, generator=g, dtype=torch.float64)


def _labels(shape, seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    labels.view(-1)[0] = 2  # rank 0's shard in both splits
    labels.view(-1)[1] = V - 1  # the last rank's
    return labels


def _cols(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _logits(h, w, b, softcap, logit_scale):
    """The float64 composition: the materialised logits before the temperature."""
    z = h @ w.T + (b if b is not None else 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z * logit_scale


def _leaves(h, w, b, rank, sizes, dtype, use_bias):
    """This rank's differentiable (hidden, weight shard, bias shard or None) in ``dtype``."""
    cols = _cols(rank, sizes)
    hid = h.to(dtype).requires_grad_()
    ws = w[cols].to(dtype).requires_grad_()
    bs = b[cols].to(dtype).requires_grad_() if use_bias else None
    return hid, ws, bs


def _check_grads(out_scalar, leaves, ref_grads, rank, sizes, group, dtype, what):
    hid, ws, bs = leaves
    inputs = [t for t in (hid, ws, bs) if t is not None]
    grads = torch.autograd.grad(out_scalar, inputs)
    cols = _cols(rank, sizes)
    _close(grads[0], ref_grads[0], dtype, f"{what} dhidden")
    _same_on_all_ranks(grads[0], group, f"{what} dhidden")
    _close(grads[1], ref_grads[1][cols], dtype, f"{what} dweight slice")
    if bs is not None:
        _close(grads[2], ref_grads[2][cols], dtype, f"{what} dbias slice")
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, what


# ----------------------------------------------------------------------------- checks
def _check_token_logprobs(rank, group, sizes):
    w, b = _head(0)
    h, labels = _hidden((2, 5), seed=1), _labels((2, 5), seed=2)
    g = torch.Generator().manual_seed(3)
    up_lp, up_h = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(2))
    cases = {
        "softcap+bias+entropy": dict(softcap=4.0, logit_scale=1.3, temperature=0.7, use_bias=True, entropy=True,
                                     chunk_size=3),
        "plain": dict(softcap=None, logit_scale=1.0, temperature=1.0, use_bias=False, entropy=False, chunk_size=None),
    }
    for name, c in cases.items():
        # float64 oracle on the materialised logits
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        br = b.clone().requires_grad_() if c["use_bias"] else None
        x = _logits(hr, wr, br, c["softcap"], c["logit_scale"])
        lp_ref, ent_ref = token_logprobs_ref(x, labels, temperature=c["temperature"])
        obj_ref = (lp_ref * up_lp).sum() + ((ent_ref * up_h).sum() if c["entropy"] else 0.0)
        ref_grads = torch.autograd.grad(obj_ref, [t for t in (hr, wr, br) if t is not None])
        # the unsharded linear op agrees with the oracle (sanity of the comparison itself)
        full = fastpo.linear_token_logprobs(h, w, labels, bias=b if c["use_bias"] else None,
                                            temperature=c["temperature"], logit_scale=c["logit_scale"],
                                            softcap=c["softcap"], return_entropy=True, backend="torch")
        _close(full[0], lp_ref, torch.float64, f"{name} unsharded logp")
        for dtype in DTYPES:
            leaves = _leaves(h, w, b, rank, sizes, dtype, c["use_bias"])
            lp, ent = fastpo.linear_token_logprobs(
                leaves[0], leaves[1], labels, bias=leaves[2], temperature=c["temperature"],
                logit_scale=c["logit_scale"], softcap=c["softcap"], return_entropy=True,
                chunk_size=c["chunk_size"], process_group=group)
            assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            _close(lp, lp_ref, dtype, f"{name} logp")
            _close(ent, ent_ref, dtype, f"{name} entropy")
            _close(lp, full[0], dtype, f"{name} logp vs unsharded")
            assert torch.all(lp[labels == -100] == 0) and torch.all(ent[labels == -100] == 0)
            _same_on_all_ranks(lp, group, "logp")
            _same_on_all_ranks(ent, group, "entropy")
            obj = (lp * up_lp.to(lp.dtype)).sum() + ((ent * up_h.to(ent.dtype)).sum() if c["entropy"] else 0.0)
            _check_grads(obj, leaves, ref_grads, rank, sizes, group, dtype, f"token {name}")


def _check_sequence_and_dpo(rank, group, sizes):
    w, b = _head(4)
    h, labels = _hidden((4, 5), seed=5), _labels((4, 5), seed=6, ignore_frac=0.2)
    g = torch.Generator().manual_seed(7)
    ref_c, ref_r = (torch.randn(2, generator=g, dtype=torch.float64) - 8 for _ in range(2))
    opts = dict(temperature=0.9, softcap=6.0)
    for average in (False, True):
        leaves_ref = [h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        ref = fastpo.linear_sequence_logprobs(*leaves_ref[:2], labels, bias=leaves_ref[2], average=average,
                                              backend="torch", **opts)
        ref_grads = torch.autograd.grad((ref * torch.arange(1.0, 5.0, dtype=ref.dtype)).sum(), leaves_ref)
        for dtype in DTYPES:
            leaves = _leaves(h, w, b, rank, sizes, dtype, True)
            out = fastpo.linear_sequence_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], average=average,
                                                  process_group=group, **opts)
            _close(out, ref, dtype, f"sequence average={average}")
            _same_on_all_ranks(out, group, "sequence logp")
            obj = (out * torch.arange(1.0, 5.0, dtype=out.dtype)).sum()
            _check_grads(obj, leaves, ref_grads, rank, sizes, group, dtype, f"sequence average={average}")
    # DPO from the materialised logits (logits-level op, float64) as the oracle
    hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
    x = _logits(hr, wr, br, opts["softcap"], 1.0)
    ref = fastpo.dpo_loss(x, labels, ref_c, ref_r, beta=0.1, temperature=opts["temperature"], backend="torch")
    ref_grads = torch.autograd.grad(ref.loss, [hr, wr, br])
    for dtype in DTYPES:
        leaves = _leaves(h, w, b, rank, sizes, dtype, True)
        out = fastpo.linear_dpo_loss(leaves[0], leaves[1], labels, ref_c.to(dtype), ref_r.to(dtype), bias=leaves[2],
                                     beta=0.1, process_group=group, **opts)
        _close(out.loss, ref.loss, dtype, "dpo loss")
        _close(out.margins, ref.margins, dtype, "dpo margins")
        _same_on_all_ranks(out.loss, group, "dpo loss")
        _check_grads(out.loss, leaves, ref_grads, rank, sizes, group, dtype, "dpo")


def _check_policy_loss(rank, group, sizes):
    b_, t_ = 3, 4
    w, b = _head(8)
    h, labels = _hidden((b_, t_), seed=9), _labels((b_, t_), seed=10)
    g = torch.Generator().manual_seed(11)
    softcap, scale = 5.0, 1.2
    with torch.no_grad():
        lp, _ = token_logprobs_ref(_logits(h, w, b, softcap, scale), labels, temperature=0.8)
    noise = lambda: 0.4 * torch.randn(b_, t_, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.rand(b_, t_, generator=g) > 0.2
    old, ref_lp = lp + noise(), lp + noise()
    adv = torch.randn(b_, generator=g, dtype=torch.float64)
    weights = torch.rand(b_, t_, generator=g, dtype=torch.float64) + 0.5
    configs = {
        "ppo+k3+entropy": (PolicyLossConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, temperature=0.8),
                           dict(policy_weights=weights)),
        "gspo": (PolicyLossConfig(variant="gspo", clip_low=3e-2, clip_high=4e-2, temperature=0.8), {}),
    }
    for name, (config, extra) in configs.items():
        hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
        x = _logits(hr, wr, br, softcap, scale)
        ref = fastpo.policy_loss(x, labels, old, adv, mask=mask, ref_logprobs=ref_lp, config=config,
                                 backend="torch", **extra)
        ref_grads = torch.autograd.grad(ref.loss * 1.7, [hr, wr, br])
        for dtype in DTYPES:
            leaves = _leaves(h, w, b, rank, sizes, dtype, True)
            cast = {k: v.to(dtype) for k, v in extra.items()}
            out = fastpo.linear_policy_loss(leaves[0], leaves[1], labels, old.to(dtype), adv.to(dtype),
                                            bias=leaves[2], mask=mask, ref_logprobs=ref_lp.to(dtype),
                                            config=config, softcap=softcap, logit_scale=scale, chunk_size=4,
                                            process_group=group, **cast)
            _close(out.loss, ref.loss, dtype, f"policy {name} loss")
            _close(out.per_token_loss, ref.per_token_loss, dtype, f"policy {name} per-token")
            for key, value in ref.metrics.items():
                assert abs(out.metrics[key].item() - value.item()) <= 1e-5 * max(1.0, abs(value.item())), key
            _same_on_all_ranks(out.loss, group, "policy loss")
            _check_grads(out.loss * 1.7, leaves, ref_grads, rank, sizes, group, dtype, f"policy {name}")


def _check_bf16_and_empty(rank, group, sizes):
    """bf16 head (dW / db accumulated in fp32, dh all-reduced in fp32) against the float64 oracle,
    loosely; a batch whose every label is ignored (empty statistics all-reduces, zero grads)."""
    w, b = _head(14)
    h, labels = _hidden((2, 5), seed=15), _labels((2, 5), seed=16)
    hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
    lp_ref, ent_ref = token_logprobs_ref(_logits(hr, wr, br, 4.0, 1.0), labels, temperature=0.7)
    ref_grads = torch.autograd.grad((lp_ref + ent_ref).sum(), [hr, wr, br])
    leaves = _leaves(h, w, b, rank, sizes, torch.bfloat16, True)
    lp, ent = fastpo.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=0.7,
                                           softcap=4.0, return_entropy=True, process_group=group)
    assert lp.dtype == torch.float32
    _close(lp, lp_ref, torch.bfloat16, "bf16 logp")
    _same_on_all_ranks(lp, group, "bf16 logp")
    _check_grads((lp + ent).sum(), leaves, ref_grads, rank, sizes, group, torch.bfloat16, "bf16 token")
    # nothing kept
    leaves = _leaves(h, w, b, rank, sizes, torch.float32, True)
    ignored = torch.full((2, 5), -100)
    lp = fastpo.linear_token_logprobs(leaves[0], leaves[1], ignored, bias=leaves[2], process_group=group)
    assert torch.equal(lp, torch.zeros(2, 5))
    grads = torch.autograd.grad(lp.sum(), list(leaves))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def _check_collectives(rank, group, sizes):
    """token log-probs: forward one all-gather of the sizes and the all-reduces [K], [3, K]; the
    backward one all-reduce of dL/dhidden [N, H]. Policy loss: all of them in the forward."""
    calls = []
    originals = dist.all_reduce, dist.all_gather

    def counted(kind, fn):
        def wrapper(tensor, *args, **kwargs):
            calls.append((kind, tuple(tensor.shape) if kind == "all_reduce" else len(tensor)))
            return fn(tensor, *args, **kwargs)
        return wrapper

    w, b = _head(0)
    h, labels = _hidden((3, 4), seed=12), _labels((3, 4), seed=13)
    k = int((labels != -100).sum())
    hid, ws, bs = _leaves(h, w, b, rank, sizes, torch.float32, True)
    dist.all_reduce, dist.all_gather = counted("all_reduce", originals[0]), counted("all_gather", originals[1])
    try:
        lp, ent = fastpo.linear_token_logprobs(hid, ws, labels, bias=bs, return_entropy=True, process_group=group)
        assert calls == [("all_gather", len(sizes)), ("all_reduce", (k,)), ("all_reduce", (3, k))], calls
        calls.clear()
        torch.autograd.grad((lp + ent).sum(), [hid, ws, bs])
        assert calls == [("all_reduce", (12, H))], calls
        calls.clear()
        zeros = torch.zeros(3, 4)
        out = fastpo.linear_policy_loss(hid.view(3, 4, H), ws, labels, zeros, torch.ones(3), bias=bs,
                                        process_group=group)
        assert calls == [("all_gather", len(sizes)), ("all_reduce", (k,)), ("all_reduce", (3, k)),
                         ("all_reduce", (12, H))], calls
        calls.clear()
        out.loss.backward()
        assert calls == [], calls
    finally:
        dist.all_reduce, dist.all_gather = originals


def _check_bad_inputs(rank, group, sizes):
    w, _ = _head(0)
    ws = w[_cols(rank, sizes)].float()
    h = torch.randn(2, H)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\).*found 37"):
        fastpo.linear_token_logprobs(h, ws, torch.tensor([3, 37]), process_group=group)
    with pytest.raises(ValueError, match="backend must be 'auto' or 'torch'"):
        fastpo.linear_token_logprobs(h, ws, torch.tensor([3, 4]), process_group=group, backend="cpu")
    with pytest.raises(TypeError, match="ProcessGroup"):
        fastpo.linear_token_logprobs(h, ws, torch.tensor([3, 4]), process_group="world")
    with pytest.raises(ValueError, match="backend must be 'auto' or 'torch'"):
        fastpo.linear_dpo_loss(h.view(2, 1, H), ws, torch.tensor([[3], [4]]), None, None, loss_type="simpo",
                               process_group=group, backend="triton")


def _worker(rank, world, store, sizes):
    group = _init(rank, world, store)
    try:
        for check in (_check_token_logprobs, _check_sequence_and_dpo, _check_policy_loss, _check_bf16_and_empty,
                      _check_collectives,
                      _check_bad_inputs):
            check(rank, group, sizes)
            dist.barrier(group)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world", sorted(SPLITS), ids=lambda w: f"{w}ranks-" + "-".join(map(str, SPLITS[w])))
def test_linear_vocab_parallel_matches_unsharded(world, tmp_path):
    assert sum(SPLITS[world]) == V
    _launch(_worker, world, tmp_path, SPLITS[world])


def test_linear_process_group_without_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        fastpo.linear_token_logprobs(torch.randn(2, H), torch.randn(5, H), torch.tensor([0, 1]), process_group=object())
