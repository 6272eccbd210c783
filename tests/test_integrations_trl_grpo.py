"""``fastpo.integrations.trl.GRPOTrainer`` (the loss from hidden states with fastpo) against TRL
1.16's own ``GRPOTrainer``: same logged values and parameter updates (fp32 tolerance), fastpo's
fused policy op ran, and the LM head ran 3 vocabulary GEMMs per loss instead of TRL's 4.

Reuses the tiny-Llama / character-tokenizer fixtures of ``test_integrations_trl_trainers``."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")

from test_integrations_trl_trainers import (_assert_same_run, _grpo, _offline, _train, model_dir,  # noqa: E402,F401
                                            tokenizer)

import fastpo.integrations.trl as ft  # noqa: E402
from fastpo.integrations import trl_grpo  # noqa: E402

GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


class _Routes:
    """Counts the subclass's loss calls by route (fused op / composed)."""

    def __init__(self, monkeypatch):
        self.fused = self.composed = 0
        fused, composed = trl_grpo.linear_policy_loss, trl_grpo.policy_loss_from_logprobs

        def count_fused(*a, **k):
            self.fused += 1
            return fused(*a, **k)

        def count_composed(*a, **k):
            self.composed += 1
            return composed(*a, **k)

        monkeypatch.setattr(trl_grpo, "linear_policy_loss", count_fused)
        monkeypatch.setattr(trl_grpo, "policy_loss_from_logprobs", count_composed)


# (config, route, with the switch on too, logged keys that must be there): why each case is there
CASES = [
    # token-level DAPO with KL (ratio-weighted, TRL's default) and a static entropy bonus: the fused op
    pytest.param(dict(loss_type="dapo", beta=0.1, entropy_coef=0.05), "fused", False,
                 {"kl", "entropy", "policy_loss", "entropy_coef", "clip_ratio/low_min", "clip_ratio/high_max"},
                 id="dapo-kl-entropy"),
    # sequence-level importance sampling: a per-sequence ratio, composed route; temperature reaches the
    # head; under the switch (old / reference scoring on fastpo as well; the capture restores the switch)
    pytest.param(dict(loss_type="grpo", beta=0.05, importance_sampling_level="sequence", temperature=0.7),
                 "composed", True, {"kl", "entropy", "clip_ratio/region_mean"}, id="grpo-sequence-is-T0.7+switch"),
    # seq-mean normaliser with delta and the top-entropy mask on policy term and bonus
    pytest.param(dict(loss_type="dr_grpo", delta=1.5, top_entropy_quantile=0.5, entropy_coef=0.05), "composed",
                 False, {"entropy", "policy_loss", "clip_ratio/high_mean"}, id="dr_grpo-delta-top-entropy"),
    # the other token-local variants on the fused op: cispo's absolute cap and its metric, sapo's gate,
    # luspo's per-sequence sum
    pytest.param(dict(loss_type="cispo", epsilon_high=1.02, beta=0.1), "fused", False, {"cispo_clip_ratio", "kl"},
                 id="cispo-kl"),
    pytest.param(dict(loss_type="sapo"), "fused", False, {"entropy"}, id="sapo"),
    pytest.param(dict(loss_type="luspo", beta=0.1), "fused", False, {"kl", "clip_ratio/low_min"}, id="luspo-kl"),
    # sequence-level weights: vespo's Gamma weight and its metric; the off-policy sequence mask
    pytest.param(dict(loss_type="vespo"), "composed", False, {"vespo/phi_seq_mean"}, id="vespo"),
    pytest.param(dict(loss_type="bnpo", off_policy_mask_threshold=0.0), "composed", False,
                 {"clip_ratio/region_mean"}, id="bnpo-off-policy-mask"),
]


@pytest.mark.parametrize("config,route,switch,keys", CASES)
def test_subclass_same_run_as_trl(config, route, switch, keys, tmp_path, tokenizer, model_dir,  # noqa: F811
                                  monkeypatch):
    ref = _train(lambda: _grpo(tmp_path, model_dir, tokenizer, **config), fastpo=False)
    routes = _Routes(monkeypatch)
    trainer_cls = ft.GRPOTrainer
    got = _train(lambda: _grpo(tmp_path, model_dir, tokenizer, trainer_cls=trainer_cls, **config), fastpo=switch)
    assert not ft.is_enabled()
    calls = {"fused": routes.fused, "composed": routes.composed}
    assert calls[route] == 2 and sum(calls.values()) == 2, calls  # one loss per step, on the expected route
    assert {"loss", "grad_norm"} | keys <= set(ref[0][0]), sorted(ref[0][0])
    _assert_same_run(ref, got)


def _head_gemms_per_loss(trainer, vocab):
    """Profiles training; returns (LM-head GEMMs inside the loss and its backward, loss calls,
    fastpo:: op names seen there). A head GEMM is an ``aten::mm`` / ``addmm`` with V in a shape."""
    scopes = ("test::loss", "test::backward")
    loss, backward = trainer.compute_loss, trainer.accelerator.backward

    def scoped_loss(*a, **k):
        with torch.profiler.record_function(scopes[0]):
            return loss(*a, **k)

    def scoped_backward(*a, **k):
        with torch.profiler.record_function(scopes[1]):
            return backward(*a, **k)

    trainer.compute_loss, trainer.accelerator.backward = scoped_loss, scoped_backward
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.train()
    events = prof.events()
    windows = [e.time_range for e in events if e.name in scopes]
    inside = lambda e: any(w.start <= e.time_range.start <= w.end for w in windows)  # noqa: E731
    gemms = [e for e in events if e.name in GEMMS and inside(e)
             and any(vocab in shape for shape in e.input_shapes if shape)]
    ops = {e.name for e in events if e.name.startswith("fastpo::") and inside(e)}
    return len(gemms), sum(e.name == scopes[0] for e in events), ops


def test_fused_route_runs_three_head_gemms(tmp_path, tokenizer, model_dir):  # noqa: F811
    config = dict(loss_type="dapo", beta=0.1, entropy_coef=0.05)
    vocab = len(tokenizer)
    trl_gemms, trl_losses, trl_ops = _head_gemms_per_loss(_grpo(tmp_path, model_dir, tokenizer, **config), vocab)
    sub = _grpo(tmp_path, model_dir, tokenizer, trainer_cls=ft.GRPOTrainer, **config)
    gemms, losses, ops = _head_gemms_per_loss(sub, vocab)
    assert trl_losses == losses == 2 and not trl_ops
    assert trl_gemms == 4 * trl_losses  # TRL: forward 1, backward 3 (one tile: V and the batch are small)
    assert gemms == 3 * losses, gemms  # fastpo: logits, dL/dhidden, dL/dweight, all in the forward
    assert "fastpo::policy_loss_fwd_inplace" in ops, ops


def test_configs_fastpo_does_not_serve_run_trls_loss(tmp_path, tokenizer, model_dir):  # noqa: F811
    """Chosen at construction, one warning, TRL's own ``_compute_loss`` afterwards."""
    served = _grpo(tmp_path, model_dir, tokenizer, trainer_cls=ft.GRPOTrainer, loss_type="bnpo")
    assert served.fastpo_fallback is None and served.fastpo_config.agg == "token-mean"
    for config, why in ((dict(loss_type="sapo", importance_sampling_level="sequence"), "sapo"),
                        (dict(use_adaptive_entropy=True), "use_adaptive_entropy")):
        with pytest.warns(UserWarning, match="using TRL's own GRPO loss"):
            trainer = _grpo(tmp_path, model_dir, tokenizer, trainer_cls=ft.GRPOTrainer, **config)
        assert trainer.fastpo_config is None and why in trainer.fastpo_fallback
