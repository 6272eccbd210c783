"""Presets (TRL here; verl and OpenRLHF in test_presets_verl_openrlhf.py): each library's
policy loss re-derived from its source (TRL GRPOTrainer._compute_loss, RLOOTrainer) and compared, values and gradients, in float64 and
float32, with fastpo driven by the preset's config and the documented call-time counts."""
import collections
import dataclasses
import inspect
import math
import types

import pytest
import torch

import fastpo
from fastpo import presets
from fastpo.functional.policy_loss import policy_loss_from_logprobs

B, T = 5, 6


def _batch(dtype=torch.float64, seed=0, empty_row=True, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.5
    old = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 0 if empty_row else 2, 1, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(lp).requires_grad_(), cast(old), cast(adv), mask, cast(ref), cast(ent).requires_grad_()


def _compare(ours, theirs, wrt, dtype, rtol64=1e-8):
    """Loss values and gradients w.r.t. each tensor in ``wrt`` (pairs: ours, theirs).
    rtol64: verl divides by count + 1e-8 where fastpo uses max(1, count) (1e-8 relative)."""
    tol = dict(rtol=rtol64, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.double(), theirs.double(), **tol)
    g_ours = torch.autograd.grad(ours, [a for a, _ in wrt], allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, [b for _, b in wrt], allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a.double(), b.double(), **tol)


# ----------------------------------------------------------------------------- TRL
def _trl_loss(lp, old, ref, adv, mask, *, loss_type, epsilon, epsilon_high, beta, delta, level,
              max_completion_length=512, num_items_in_batch=None, num_processes=1, grad_accum=1,
              steps_per_generation=None, ent=None, entropy_coef=0.0, bias_kl=False, tau=(1.0, 1.05),
              vespo=(2.0, 3.0, 3.0, 2.0), top_q=1.0, opm=None, sampling=None, is_ratio=None):
    """TRL 1.16 GRPOTrainer._compute_loss (training mode), transcribed."""
    mask = mask.to(lp.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ent_mask = None
    if top_q < 1.0:
        thr = torch.quantile(ent.detach()[mask.bool()], 1 - top_q)
        ent_mask = (ent.detach() * mask >= thr) & mask.bool()
    if opm is not None:
        samp = old if sampling is None else sampling
        d = torch.nan_to_num(samp - lp.detach(), nan=0.0)
        seq_kl = (d * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_mask = ((adv >= 0) | (seq_kl <= opm)).to(mask.dtype)
    log_ratio = lp - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        if bias_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        ptl = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * lp
    elif loss_type == "sapo":
        t = torch.where(adv > 0, torch.tensor(tau[0], dtype=lp.dtype), torch.tensor(tau[1], dtype=lp.dtype))
        ptl = -torch.sigmoid(t * (coef_1 - 1)) * 4 / t * adv
    elif loss_type == "vespo":
        with torch.no_grad():
            low = math.log(1e-8)
            s = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
            if is_ratio is not None:
                s = s + torch.log(is_ratio).clamp(low, 20.0).sum(-1, keepdim=True)
            lw = s.clamp(low, 20.0)
            k = torch.where(adv >= 0, torch.tensor(vespo[0], dtype=lp.dtype), torch.tensor(vespo[2], dtype=lp.dtype))
            lam = torch.where(adv >= 0, torch.tensor(vespo[1], dtype=lp.dtype),
                              torch.tensor(vespo[3], dtype=lp.dtype)).clamp(min=1e-4)
            phi = torch.exp(lam + k * lw - lam * lw.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        ptl = -phi * adv * lp
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        ptl = -torch.min(coef_1 * adv, coef_2 * adv)
    if opm is not None:
        ptl = ptl * off_mask
    if ent_mask is not None:
        ptl = ptl * ent_mask
    if is_ratio is not None and loss_type != "vespo":
        ptl = ptl * is_ratio
    if beta != 0.0:
        ptl = ptl + beta * per_token_kl
    if loss_type in ("grpo", "sapo"):
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    elif loss_type == "bnpo":
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum
    elif loss_type == "dr_grpo":
        loss = (ptl * mask).sum() / (ptl.size(0) * max_completion_length) / grad_accum
    elif loss_type == "luspo":
        loss = (ptl * mask).sum(-1).mean() / grad_accum
    else:  # dapo, cispo, vespo
        spg = grad_accum if steps_per_generation is None else steps_per_generation
        normalizer = torch.as_tensor(float(num_items_in_batch)).clamp(min=1.0) / num_processes * grad_accum / spg
        loss = (ptl * mask).sum() / normalizer
    if entropy_coef != 0.0:
        eff = mask if ent_mask is None else mask * ent_mask
        loss = loss - entropy_coef * ((ent * eff).sum() / eff.sum().clamp(min=1.0) / grad_accum)
    return loss


TRL_SETTINGS = {
    "defaults": dict(epsilon=0.2, epsilon_high=None, beta=0.0, delta=None),
    "clip_higher_kl": dict(epsilon=0.2, epsilon_high=0.28, beta=0.04, delta=None),
    "two_sided_delta": dict(epsilon=0.2, epsilon_high=0.28, beta=0.001, delta=1.3),  # INTELLECT-2
}


def _trl_call_counts(loss_type, mask, G, items, procs, spg):
    """The documented call-time normalisers of presets.trl_grpo."""
    if loss_type in ("grpo", "dr_grpo", "sapo", "luspo"):
        return dict(num_sequences=B * G)
    if loss_type == "bnpo":
        return dict(num_tokens=max(1, int(mask.sum())) * G)
    return dict(num_tokens=max(1.0, items) / procs * G / spg)


@pytest.mark.parametrize("bias_kl", [False, True])  # True: TRL 1.16's default, KL * ratio
@pytest.mark.parametrize("setting", list(TRL_SETTINGS))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])  # sequence = GSPO, (B, 1) weights in TRL
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trl_grpo_family(bias_kl, setting, loss_type, level, dtype):
    opts = TRL_SETTINGS[setting]
    lp, old, adv, mask, ref, _ = _batch(dtype)
    mcl = 8  # max_completion_length != T so that dr_grpo's constant is visible
    cfg = presets.trl_grpo(loss_type=loss_type, importance_sampling_level=level, max_completion_length=mcl,
                           use_bias_correction_kl=bias_kl, **opts)
    G, procs, spg = 2, 2, 4  # gradient accumulation, processes, steps_per_generation
    items = float(mask.sum()) * 8 + 17  # tokens of the whole generation batch
    call = _trl_call_counts(loss_type, mask, G, items, procs, spg)
    ours = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, config=cfg, **call).loss
    lp2 = lp.detach().clone().requires_grad_()
    eps_high = opts["epsilon"] if opts["epsilon_high"] is None else opts["epsilon_high"]
    theirs = _trl_loss(lp2, old, ref, adv, mask, loss_type=loss_type, epsilon=opts["epsilon"], epsilon_high=eps_high,
                       beta=opts["beta"], delta=opts["delta"], level=level, max_completion_length=mcl,
                       num_items_in_batch=items, num_processes=procs, grad_accum=G, steps_per_generation=spg,
                       bias_kl=bias_kl)
    _compare(ours, theirs, [(lp, lp2)], dtype)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trl_cispo(beta, dtype):
    lp, old, adv, mask, ref, _ = _batch(dtype)
    cfg = presets.trl_grpo(loss_type="cispo", epsilon_high=1.3, beta=beta)
    items = float(mask.sum())
    ours = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, config=cfg, num_tokens=items).loss
    lp2 = lp.detach().clone().requires_grad_()
    theirs = _trl_loss(lp2, old, ref, adv, mask, loss_type="cispo", epsilon=0.2, epsilon_high=1.3, beta=beta,
                       delta=None, level="token", num_items_in_batch=items, bias_kl=True)
    _compare(ours, theirs, [(lp, lp2)], dtype)


TRL_FEATURES = {  # TRL options beyond the loss type, each checked against the transcription
    "sapo": dict(loss_type="sapo", beta=0.04),
    "sapo-temps": dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=2.0),
    "vespo": dict(loss_type="vespo", beta=0.04),
    "vespo-shape": dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0,
                        vespo_lambda_neg=0.0),
    "vespo-is": dict(loss_type="vespo", is_ratio=True),
    "top-entropy": dict(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.01),
    "off-policy-mask": dict(loss_type="grpo", off_policy_mask_threshold=0.05, sampling=True),
    "off-policy-mask-old": dict(loss_type="bnpo", off_policy_mask_threshold=0.02, beta=0.04),
    "vllm-is": dict(loss_type="dapo", is_ratio=True, beta=0.04),
    "entropy-grpo": dict(loss_type="grpo", entropy_coef=0.03),
    "everything": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04, is_ratio=True,
                       top_entropy_quantile=0.6, off_policy_mask_threshold=0.05, entropy_coef=0.02),
}


@pytest.mark.parametrize("name", list(TRL_FEATURES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trl_features(name, dtype):
    opts = dict(TRL_FEATURES[name])
    lp, old, adv, mask, ref, ent = _batch(dtype)
    g = torch.Generator().manual_seed(7)
    sampling = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)) if opts.pop("sampling", 0) else None
    is_ratio = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) * 1.5 + 0.2 if opts.pop("is_ratio", 0) else None
    if is_ratio is not None:
        is_ratio = torch.where(mask.bool(), is_ratio, torch.ones((), dtype=dtype))  # TRL: 1 on padding
    G = 2
    loss_type, level = opts["loss_type"], opts.get("importance_sampling_level", "token")
    cfg = presets.trl_grpo(**opts)
    items = float(mask.sum()) * 3 + 1
    call = _trl_call_counts(loss_type, mask, G, items, 1, G)
    if opts.get("entropy_coef"):
        eff = mask.bool()
        if opts.get("top_entropy_quantile", 1.0) < 1.0:
            thr = torch.quantile(ent.detach()[mask.bool()], 1 - opts["top_entropy_quantile"])
            eff = eff & (ent.detach() >= thr)
        call["aux_num_tokens"] = max(1, int(eff.sum())) * G
    ours = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg,
                                     policy_weights=is_ratio, rollout_logprobs=sampling, **call).loss
    lp2, ent2 = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    keys = ("sapo_temperature_pos", "sapo_temperature_neg")
    tau = tuple(opts.get(k, d) for k, d in zip(keys, (1.0, 1.05)))
    vk = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    vespo = tuple(opts.get(k, d) for k, d in zip(vk, (2.0, 3.0, 3.0, 2.0)))
    theirs = _trl_loss(lp2, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=0.2,
                       beta=opts.get("beta", 0.0), delta=None, level=level, num_items_in_batch=items,
                       grad_accum=G, ent=ent2, entropy_coef=opts.get("entropy_coef", 0.0), bias_kl=True, tau=tau,
                       vespo=vespo, top_q=opts.get("top_entropy_quantile", 1.0),
                       opm=opts.get("off_policy_mask_threshold"), sampling=sampling, is_ratio=is_ratio)
    _compare(ours, theirs, [(lp, lp2), (ent, ent2)], dtype)


def test_trl_bnpo_entropy_bonus():
    # TRL 1.16 entropy bonus: a local token mean / G over the tokens it acts on, for every loss type
    lp, old, adv, mask, ref, ent = _batch()
    G = 3
    cfg = presets.trl_grpo(loss_type="bnpo", entropy_coef=0.01)
    count = max(1, int(mask.sum())) * G
    ours = policy_loss_from_logprobs(lp, old, adv, mask, entropy=ent, config=cfg, num_tokens=count,
                                     aux_num_tokens=count).loss
    lp2, ent2 = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    theirs = _trl_loss(lp2, old, ref, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
                       delta=None, level="token", grad_accum=G, ent=ent2, entropy_coef=0.01)
    _compare(ours, theirs, [(lp, lp2), (ent, ent2)], torch.float64)


def _installed_trl_loss(module, lp, ent, inputs, *, loss_type, level, eps_high, beta, delta, G, procs, spg, mcl,
                        trl_args=None, entropy_coef=0.0, top_q=1.0, opm=None, use_vllm=False):
    """Call the installed GRPOTrainer._compute_loss on a stand-in trainer: only the model
    forward (which returns our log-probs) and the distributed plumbing are faked; every other
    option takes GRPOConfig's default unless given."""
    ns = types.SimpleNamespace
    defaults = {f.name: f.default for f in dataclasses.fields(module.GRPOConfig) if f.name in _TRL_ARG_NAMES}
    args = ns(**{**defaults, "delta": delta, "steps_per_generation": spg, **(trl_args or {})})
    accelerator = ns(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
                     pad_across_processes=lambda x, dim=0, pad_index=0: x, num_processes=procs, sync_gradients=True)
    fake = ns(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None),
        aux_loss_enabled=False, top_entropy_quantile=top_q, off_policy_mask_threshold=opm, beta=beta,
        importance_sampling_level=level, epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
        max_completion_length=mcl, args=args, accelerator=accelerator, model=ns(training=True),
        _metrics={"train": collections.defaultdict(list)}, current_gradient_accumulation_steps=G, use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm, _entropy_bonus_enabled=entropy_coef != 0.0,
        use_adaptive_entropy=False, entropy_coef=entropy_coef,
        get_off_policy_mask=module.GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=module.GRPOTrainer.get_gamma_weights,
    )
    fake.get_high_entropy_mask = lambda *a: module.GRPOTrainer.get_high_entropy_mask(fake, *a)
    return module.GRPOTrainer._compute_loss(fake, None, inputs)


_TRL_ARG_NAMES = ("use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                  "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_target")


@pytest.mark.parametrize(
    "loss_type,level,beta,delta,extra",
    [
        ("grpo", "token", 0.04, None, {}),
        ("grpo", "sequence", 0.04, None, {}),  # GSPO, KL * sequence ratio
        ("bnpo", "token", 0.04, 1.3, {}),
        ("dr_grpo", "token", 0.001, None, {}),
        ("dapo", "token", 0.04, 1.3, {}),
        ("dapo", "sequence", 0.0, 1.2, {}),
        ("cispo", "token", 0.04, None, {}),
        ("sapo", "token", 0.04, None, {}),
        ("luspo", "sequence", 0.04, None, {}),
        ("luspo", "token", 0.0, None, {}),
        ("vespo", "token", 0.04, None, {}),
        ("vespo", "token", 0.0, None, dict(use_vllm=True)),
        ("dapo", "token", 0.04, None, dict(use_vllm=True, opm=0.05, top_q=0.5, entropy_coef=0.02)),
        ("grpo", "token", 0.0, None, dict(entropy_coef=0.05)),
        ("bnpo", "token", 0.04, None, dict(bias=False)),  # use_bias_correction_kl=False
    ],
)
def test_against_installed_trl(loss_type, level, beta, delta, extra):
    """Where trl is installed, its own _compute_loss is the oracle (values and gradients), with
    GRPOConfig's defaults for everything not listed. Skips without trl, or when that trl version
    needs attributes the stand-in lacks."""
    module = pytest.importorskip("trl.trainer.grpo_trainer")
    extra = dict(extra)
    lp, old, adv, mask, ref, ent = _batch(torch.float32)
    ent = ent.detach()
    G, procs, spg, mcl = 2, 2, 4, 16
    eps_high = 1.3 if loss_type == "cispo" else 0.28
    items = torch.tensor(float(mask.sum()) * 8 + 5)
    bias = extra.pop("bias", True)
    use_vllm = extra.pop("use_vllm", False)
    cfg = presets.trl_grpo(loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high, beta=beta, delta=delta,
                           importance_sampling_level=level, max_completion_length=mcl, use_bias_correction_kl=bias,
                           entropy_coef=extra.get("entropy_coef", 0.0), top_entropy_quantile=extra.get("top_q", 1.0),
                           off_policy_mask_threshold=extra.get("opm"))
    g = torch.Generator().manual_seed(11)
    sampling = old + 0.2 * torch.randn(B, T, generator=g)
    is_ratio = fastpo.rollout_is_weights(old, sampling, mask, mode="mask", high=3.0, log_clamp=None)
    is_ratio = torch.where(mask.bool(), is_ratio, torch.ones(()))  # TRL's ratio is 1 on padding
    call = _trl_call_counts(loss_type, mask, G, float(items), procs, spg)
    if extra.get("entropy_coef"):
        eff = mask.bool()
        if extra.get("top_q", 1.0) < 1.0:
            eff = eff & (ent >= torch.quantile(ent[mask.bool()], 1 - extra["top_q"]))
        call["aux_num_tokens"] = max(1, int(eff.sum())) * G
    vllm = dict(policy_weights=is_ratio, rollout_logprobs=sampling) if use_vllm else {}
    ours = policy_loss_from_logprobs(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, config=cfg, **call,
                                     **vllm).loss
    lp2 = lp.detach().clone().requires_grad_()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": items,
    }
    if use_vllm:
        inputs.update(importance_sampling_ratio=is_ratio, sampling_per_token_logps=sampling)
    try:
        theirs = _installed_trl_loss(module, lp2, ent, inputs, loss_type=loss_type, level=level,
                                     eps_high=eps_high, beta=beta, delta=delta, G=G, procs=procs, spg=spg, mcl=mcl,
                                     trl_args=dict(use_bias_correction_kl=bias), use_vllm=use_vllm, **extra)
    except (AttributeError, KeyError, TypeError) as exc:
        pytest.skip(f"this trl version's _compute_loss needs more than the stand-in provides: {exc!r}")
    _compare(ours, theirs, [(lp, lp2)], torch.float32)


def test_trl_default_config_is_the_preset_default():
    """presets.trl_grpo()'s keyword defaults are GRPOConfig's (TRL 1.16)."""
    module = pytest.importorskip("trl.trainer.grpo_config")
    fields = {f.name: f.default for f in dataclasses.fields(module.GRPOConfig)}
    sig = inspect.signature(presets.trl_grpo).parameters
    for name, param in sig.items():
        if name in fields:
            assert param.default == fields[name], name


@pytest.mark.parametrize("eps", [(0.2, None), (0.1, 0.3)])
def test_against_installed_trl_rloo(eps):
    module = pytest.importorskip("trl.trainer.rloo_trainer")
    lp, old, adv, mask, _, ent = _batch(torch.float32, empty_row=False, seed=5)
    old = lp.detach() + 0.05 * torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    cfg = presets.trl_rloo(epsilon=eps[0], epsilon_high=eps[1])
    ours = policy_loss_from_logprobs(lp, old, adv, mask, config=cfg).loss
    lp2 = lp.detach().clone().requires_grad_()
    ns = types.SimpleNamespace
    fake = ns(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp2, ent.detach(), None), aux_loss_enabled=False,
        epsilon_low=eps[0], epsilon_high=eps[0] if eps[1] is None else eps[1], model=ns(training=True),
        accelerator=ns(gather=lambda x: x, reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x),
        _metrics={"train": collections.defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_logps": (old * mask).sum(1),
    }
    try:
        theirs = module.RLOOTrainer._compute_loss(fake, None, inputs)
    except (AttributeError, KeyError, TypeError) as exc:
        pytest.skip(f"this trl version's RLOO _compute_loss needs more than the stand-in provides: {exc!r}")
    _compare(ours, theirs, [(lp, lp2)], torch.float32)


# ----------------------------------------------------------------------------- options
def test_preset_defaults():
    cfg = presets.trl_grpo()
    assert (cfg.variant, cfg.agg, cfg.clip_low, cfg.clip_high, cfg.kl_coef) == ("ppo", "token-mean", 0.2, 0.2, 0.0)
    cfg = presets.verl()
    assert (cfg.dual_clip, cfg.logratio_clamp, cfg.kl_coef, cfg.agg) == (3.0, 20.0, 0.0, "token-mean")
    assert presets.verl(use_kl_loss=True, kl_loss_type="low_var_kl+").kl_estimator == "k3+"
    cfg = presets.openrlhf()
    assert (cfg.variant, cfg.agg, cfg.kl_coef, cfg.dual_clip) == ("ppo", "token-mean", 0.0, None)
    cfg = presets.trl_grpo(loss_type="cispo", epsilon_high=5.0)
    assert (cfg.variant, cfg.clip_low, cfg.clip_high) == ("cispo", 1.0, 4.0)


@pytest.mark.parametrize(
    "fn,kwargs,match",
    [
        (presets.trl_grpo, dict(loss_type="reinforce"), "loss_type"),
        (presets.trl_grpo, dict(loss_type="sapo", importance_sampling_level="sequence"), "sapo"),
        (presets.trl_grpo, dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.1), "vespo"),
        (presets.trl_grpo, dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
        (presets.trl_grpo, dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_tau_neg"),
        (presets.trl_grpo, dict(importance_sampling_level="group"), "importance_sampling_level"),
        (presets.trl_grpo, dict(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence"), "cispo"),
        (presets.trl_grpo, dict(loss_type="cispo"), "epsilon_high"),  # TRL would cap ratios at 0.2
        (presets.trl_grpo, dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length"),
        (presets.trl_grpo, dict(epsilon=-0.1), "clip_low"),
        (presets.verl, dict(kl_loss_type="full"), "kl_loss_type"),
        (presets.verl, dict(loss_agg_mode="token-mean-unbiased"), "loss_agg_mode"),
        (presets.verl, dict(clip_ratio_c=1.0), "dual_clip"),
        (presets.verl, dict(loss_mode="clip_cov"), "loss_mode"),
        (presets.verl, dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-sum-norm", use_kl_loss=True), "two"),
        (presets.openrlhf, dict(policy_loss_type="reinforce"), "policy_loss_type"),
        (presets.openrlhf, dict(kl_estimator="k4"), "kl_estimator"),
    ],
)
def test_preset_bad_options(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
