"""PPOTrainer, RewardTrainer and `fastpo train ppo|rm`: short runs through the CLI (files,
reloadable models, metrics), each loss against a plain torch composition (materialised logits
-> fastpo.policy_loss + fastpo.value_loss; -log sigmoid of the hand-read score margin), the
advantage pipeline against a hand-written GAE loop, and bad input. CPU, offline."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import fastpo  # noqa: E402
from fastpo.cli import main  # noqa: E402
from fastpo.trainers import (PPOConfig, PPOTrainer, RewardModelScorer, RewardTrainer, addition,  # noqa: E402
                             build_model, build_tokenizer, reward_model_from)
from fastpo.trainers.dpo import pair_batch  # noqa: E402
from fastpo.trainers.ppo import ppo_advantages, ppo_loss, value_head_for  # noqa: E402
from fastpo.trainers.reward import reward_loss  # noqa: E402
from fastpo.trainers.rollout import generate, pack  # noqa: E402

PPO_FIELDS = {"step", "time", "lr", "loss", "reward", "kl", "clip_frac_low", "clip_frac_high", "value_loss"}
RM_FIELDS = {"step", "time", "lr", "loss", "pair_accuracy", "margin"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT model (30 steps), then rm and ppo stages from it through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--eval-prompts", "40", "--eval-every", "2"]
    assert main(["train", "sft", "--out", str(root / "sft"), "--steps", "30", *common]) == 0
    assert main(["train", "rm", "--out", str(root / "rm"), "--steps", "4", *common]) == 0
    assert main(["train", "ppo", "--out", str(root / "ppo"), "--steps", "3", *common]) == 0
    assert main(["train", "ppo", "--out", str(root / "ppo_rm"), "--steps", "2", "--model", str(root / "sft"),
                 "--reward-model", str(root / "rm"), *common]) == 0
    return root


@pytest.fixture
def default():
    tokenizer = build_tokenizer()
    return build_model(tokenizer, seed=0), tokenizer


def _rows(path, kind):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


# ----------------------------------------------------------------------------- pipeline
def test_cli_ppo_stage(runs):
    out = runs / "ppo"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "value_head.pt", "metrics.jsonl",
                 "summary.json"):
        assert (out / name).is_file(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    value_head = torch.load(out / "value_head.pt")
    assert value_head["weight"].shape == (1, model.config.hidden_size) and value_head["bias"].shape == (1,)
    train = _rows(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert PPO_FIELDS <= set(r), r
        assert all(math.isfinite(r[k]) for k in ("loss", "value_loss", "kl", "reward"))
        assert 0.0 <= r["reward"] <= 1.0 and 0.0 <= r["clip_frac_low"] <= 1.0
    evals = _rows(out / "metrics.jsonl", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 3 and "hard_accuracy" in evals[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "ppo" and summary["steps"] == 3 and summary["model_from"] == str(runs / "sft")


def test_cli_rm_stage(runs):
    out = runs / "rm"
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    train = _rows(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(RM_FIELDS <= set(r) and math.isfinite(r["loss"]) for r in train)
    evals = _rows(out / "metrics.jsonl", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 4 and 0.0 <= evals[-1]["pair_accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "rm" and summary["after"] == evals[-1]
    # the saved dir scores completions as a reward function
    scores = RewardModelScorer(out)(["12+35=", "12+35="], ["047", "046"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_cli_ppo_with_reward_model(runs):
    out = runs / "ppo_rm"
    train = _rows(out / "metrics.jsonl", "train")
    assert len(train) == 2 and all({"reward", "task_reward"} <= set(r) for r in train)
    assert all(0.0 <= r["task_reward"] <= 1.0 for r in train)
    assert json.loads((out / "summary.json").read_text())["reward_model"] == str(runs / "rm")


def test_cli_train_all(tmp_path, capsys):
    argv = ["train", "all", "--out", str(tmp_path), "--steps", "2", "--sft-steps", "20", "--eval-prompts", "40",
            "--eval-every", "0"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["sft", "rm", "ppo", "grpo", "dpo", "ppo_rm"]
    for r in report["rows"]:
        assert r["steps"] == (20 if r["method"] == "sft" else 2) and r["seconds"] >= 0
        assert 0.0 <= r["after"] <= 1.0 and (r["method"] == "rm") == (r["hard_accuracy"] is None)
        assert (tmp_path / r["method"] / "summary.json").is_file()
    assert (tmp_path / "ppo" / "value_head.pt").is_file()
    if importlib.util.find_spec("matplotlib"):  # the methods compared, and each stage's curves
        assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
        assert all((tmp_path / r["method"] / "curves.png").is_file() for r in report["rows"])
    assert json.loads((tmp_path / "ppo_rm" / "summary.json").read_text())["reward_model"] == str(tmp_path / "rm")
    printed = capsys.readouterr().out
    assert "method" in printed and "ppo" in printed and "report.json" in printed


# ----------------------------------------------------------------------------- bad input
def test_cli_missing_reward_model_dir(tmp_path, capsys):
    argv = ["train", "ppo", "--out", str(tmp_path / "p"), "--reward-model", str(tmp_path / "nope")]
    assert main(argv) == 2
    assert "reward model dir" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "sft").exists()  # nothing ran


def test_cli_reward_model_only_for_ppo(tmp_path, capsys):
    assert main(["train", "grpo", "--out", str(tmp_path / "g"), "--reward-model", str(tmp_path)]) == 2
    assert "--reward-model is for the ppo stage" in capsys.readouterr().err


def test_ppo_bad_inputs(default):
    model, tokenizer = default
    with pytest.raises(ValueError, match="dataset is empty"):
        PPOTrainer(model, tokenizer, addition.addition_reward, [])
    with pytest.raises(ValueError, match="at least one reward function"):
        PPOTrainer(model, tokenizer, [], addition.prompts(4, 0))
    trainer = PPOTrainer(model, tokenizer, lambda p, c: [0.0] * (len(p) - 1), addition.prompts(8, 0),
                         PPOConfig(steps=1, rollouts_per_step=4, eval_every=0))
    with pytest.raises(ValueError, match="returned 3 rewards for 4"):
        trainer.train()
    assert trainer.step == 0


def test_rm_bad_inputs(default):
    model, tokenizer = default
    rm = reward_model_from(model, tokenizer)
    with pytest.raises(ValueError, match="dataset is empty"):
        RewardTrainer(rm, tokenizer, [])
    rm.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(rm, tokenizer, addition.preference_pairs(4, 0))


# ----------------------------------------------------------------------------- losses vs plain torch
def _logits(model, batch):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                output_hidden_states=True)
    return out.logits[:, :-1].float(), out.hidden_states[-1][:, :-1]


def test_ppo_loss_is_policy_plus_value_loss_on_logits(default):
    model, tokenizer = default
    torch.manual_seed(0)
    ro = generate(model, tokenizer, addition.prompts(8, 0), max_new_tokens=4)
    batch = pack(ro)
    mask = batch.labels != -100
    value_head = value_head_for(model)
    torch.nn.init.normal_(value_head.weight, std=0.3)  # nonzero values, so the value loss has a gradient
    config = PPOConfig(vf_coef=0.5, value_clip=0.2)
    logits, hidden = _logits(model, batch)
    with torch.no_grad():
        old = fastpo.token_logprobs(logits, batch.labels) + 0.5 * torch.randn(mask.shape) * mask  # off-policy
        old_values = (value_head(hidden).squeeze(-1) + 0.3 * torch.randn(mask.shape)) * mask
    advantages = torch.randn(mask.shape) * mask
    returns = torch.randn(mask.shape) * mask
    loss, policy, value = ppo_loss(model, value_head, batch, old, old_values, advantages, returns, config)
    params = [model.lm_head.weight, value_head.weight]
    grads = torch.autograd.grad(loss, params)
    logits, hidden = _logits(model, batch)
    expected_policy = fastpo.policy_loss(logits, batch.labels, old, advantages, mask=mask, config=config.loss,
                                         backend="torch")
    expected_value = fastpo.value_loss(value_head(hidden).squeeze(-1), old_values, returns, mask, clip=0.2)
    expected = expected_policy.loss + 0.5 * expected_value
    expected_grads = torch.autograd.grad(expected, params)
    assert policy.metrics["clip_frac_low"] + policy.metrics["clip_frac_high"] > 0  # the clip is exercised
    torch.testing.assert_close(policy.loss, expected_policy.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)


def test_ppo_advantages_match_hand_written_gae():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    scores, kl, values = torch.randn(3), torch.randn(3, 4) * mask, torch.randn(3, 4) * mask
    config = PPOConfig(kl_coef=0.05, gamma=1.0, lam=0.95)
    adv, ret = ppo_advantages(scores, kl, values, mask, config)
    raw = torch.zeros(3, 4)
    for b in range(3):
        n = int(mask[b].sum())
        rewards = [-0.05 * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0) for t in range(n)]
        nxt = 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            nxt = rewards[t] + v_next - values[b, t].item() + 0.95 * nxt
            raw[b, t] = nxt
    torch.testing.assert_close(ret, (raw + values) * mask, rtol=1e-5, atol=1e-6)
    kept = raw[mask]
    torch.testing.assert_close(adv[mask], (kept - kept.mean()) / kept.std(), rtol=1e-4, atol=1e-5)


def test_rm_loss_is_logsigmoid_margin_by_hand(default):
    model, tokenizer = default
    rm = reward_model_from(model, tokenizer)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    pairs = addition.preference_pairs(6, 0)
    batch = pair_batch(tokenizer, pairs, "cpu")
    loss, chosen, rejected = reward_loss(rm, batch)
    # by hand: the trunk's last hidden state at each row's EOS, through the score head
    hidden = rm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids).last_hidden_state
    eos = [row.tolist().index(tokenizer.eos_token_id) for row in batch.input_ids]
    r = torch.stack([rm.score(hidden[i, t]).squeeze() for i, t in enumerate(eos)])
    expected = -torch.log(torch.sigmoid(r[:6] - r[6:])).mean()
    torch.testing.assert_close(torch.cat([chosen, rejected]), r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # and the trunk really is the policy's
    torch.testing.assert_close(rm.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ----------------------------------------------------------------------------- full quality (slow)
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTPO_SLOW") != "1", reason="full-quality run: set FASTPO_SLOW=1 (~1.5 min)")
def test_default_ppo_and_rm_quality(tmp_path):
    for stage in ("sft", "rm", "ppo"):
        assert main(["train", stage, "--out", str(tmp_path / stage)]) == 0
    after = {s: json.loads((tmp_path / s / "summary.json").read_text())["after"] for s in ("sft", "rm", "ppo")}
    assert after["ppo"]["accuracy"] >= 0.95 and after["ppo"]["hard_accuracy"] >= 0.9
    assert after["rm"]["pair_accuracy"] >= 0.92  # the 0.92-0.97 (measured 0.924/0.944/0.948, seeds 0/1/2)
