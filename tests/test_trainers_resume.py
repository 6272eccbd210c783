"""Checkpoints and exact resume (fastpo/trainers/checkpoint.py): a run interrupted after step k
and resumed from its last checkpoint ends with bitwise the same parameters (model, PPO's value
head) and the same metrics rows (but ``time``) as a run never interrupted; the CLI's
``--save-every`` / ``--resume``; the atomic write; the errors. CPU, offline, tiny configs."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from fastpo.cli import main  # noqa: E402
from fastpo.trainers import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer,  # noqa: E402
                             RewardConfig, RewardTrainer, SFTConfig, SFTTrainer, addition, build_model,
                             build_tokenizer, checkpoint, reward_model_from)

STEPS, SAVE_EVERY, CRASH_AT = 5, 2, 4  # checkpoints at steps 2 and 4; the crash loses step 5 only


def _evaluator(model, tokenizer):
    return addition.evaluate(model, tokenizer, n=16)


def _shaped_reward(prompts, completions):
    """Varies on an untrained model's samples (the task reward is 0 on all of them, which would
    leave GRPO's and PPO's parameters unchanged and the test unable to fail)."""
    return [len(c) / 4 + c.count("1") for c in completions]


def _pairs():
    return [(p, addition.answer_of(*map(int, p[:-1].split("+"))), "000") for p in addition.prompts(16, 3)]


def _trainer(kind: str, metrics_path=None):
    """A fresh trainer on the seed-0 tiny default; every call builds the same starting state."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    torch.manual_seed(0)
    common = dict(steps=STEPS, eval_every=2, seed=1)
    if kind == "sft":
        return SFTTrainer(model, tokenizer, addition.demonstrations(64, 0), SFTConfig(batch_size=8, **common),
                          evaluator=_evaluator, metrics_path=metrics_path)
    if kind == "grpo":
        return GRPOTrainer(model, tokenizer, _shaped_reward, addition.prompts(64, 0),
                           GRPOConfig(prompts_per_step=2, group_size=4, num_minibatches=2, **common),
                           evaluator=_evaluator, metrics_path=metrics_path)
    if kind == "ppo":
        return PPOTrainer(model, tokenizer, _shaped_reward, addition.prompts(64, 0),
                          PPOConfig(rollouts_per_step=8, **common), evaluator=_evaluator, metrics_path=metrics_path)
    if kind == "dpo":
        return DPOTrainer(model, tokenizer, _pairs(), DPOConfig(batch_size=4, **common), evaluator=_evaluator,
                          metrics_path=metrics_path)
    return RewardTrainer(reward_model_from(model, tokenizer), tokenizer, addition.preference_pairs(64, 0),
                         RewardConfig(batch_size=4, **common), eval_pairs=addition.preference_pairs(16, 9),
                         metrics_path=metrics_path)


class Crash(RuntimeError):
    pass


def _crash_after(trainer, step: int):
    """Make the run die while logging step ``step + 1`` (after its update: that step is lost)."""
    write = trainer.metrics.write

    def dying(**row):
        if row.get("type") == "train" and row["step"] == step + 1:
            raise Crash(f"killed at step {step + 1}")
        return write(**row)

    trainer.metrics.write = dying


def _state(trainer) -> dict:
    return {f"{name}.{k}": v.detach().clone() for name in trainer.checkpoint_modules
            for k, v in getattr(trainer, name).state_dict().items()}


def _no_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.mark.parametrize("kind", ["sft", "grpo", "ppo", "dpo", "rm"])
def test_interrupted_and_resumed_run_equals_uninterrupted(kind, tmp_path):
    straight = _trainer(kind)
    straight.train()
    ckpt = tmp_path / "checkpoint"
    crashed = _trainer(kind, metrics_path=str(tmp_path / "metrics.jsonl"))
    _crash_after(crashed, CRASH_AT)
    with pytest.raises(Crash):
        crashed.train(checkpoint_dir=str(ckpt), save_every=SAVE_EVERY)
    assert sorted(os.listdir(ckpt)) == [checkpoint.FILE]  # no temporary file left behind
    assert torch.load(ckpt / checkpoint.FILE, weights_only=False)["step"] == CRASH_AT
    resumed = _trainer(kind, metrics_path=str(tmp_path / "metrics.jsonl"))
    resumed.train(checkpoint_dir=str(ckpt), resume=True)
    assert resumed.step == STEPS
    want, got = _state(straight), _state(resumed)
    start = _state(_trainer(kind))
    assert any(not torch.equal(want[k], start[k]) for k in want)  # it trained: a wrong resume would show
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{kind}: {k} differs after resume"
    assert _no_time(resumed.metrics.rows) == _no_time(straight.metrics.rows)
    with open(tmp_path / "metrics.jsonl") as f:  # the file holds each row once, in order
        assert _no_time(map(json.loads, f)) == _no_time(straight.metrics.rows)
    assert [r["time"] for r in resumed.metrics.rows] == sorted(r["time"] for r in resumed.metrics.rows)


def test_resume_needs_a_checkpoint_and_the_same_config(tmp_path):
    trainer = _trainer("sft")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        trainer.train(checkpoint_dir=str(tmp_path / "none"), resume=True)
    assert trainer.step == 0 and trainer.metrics.rows == []
    first = _trainer("sft")
    first.train(checkpoint_dir=str(tmp_path / "c"), save_every=2)
    other = _trainer("sft")
    other.config.lr = other.config.lr * 2
    with pytest.raises(ValueError, match="another config .*differs in: lr"):
        other.train(checkpoint_dir=str(tmp_path / "c"), resume=True)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        _trainer("sft").train(save_every=2)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer("sft")
    trainer.train(checkpoint_dir=str(tmp_path), save_every=2)  # the last checkpoint: step 4
    before = (tmp_path / checkpoint.FILE).read_bytes()

    def half_written(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(trainer, torch.Generator(), str(tmp_path))
    assert (tmp_path / checkpoint.FILE).read_bytes() == before
    assert torch.load(tmp_path / checkpoint.FILE, weights_only=False)["step"] == 4


def test_cli_save_every_and_resume(tmp_path, capsys):
    common = ["--steps", "3", "--eval-prompts", "16", "--eval-every", "2"]
    out = tmp_path / "sft"
    assert main(["train", "sft", "--out", str(out), "--save-every", "2", *common]) == 0
    assert (out / "checkpoint" / checkpoint.FILE).is_file()
    first = (out / "model.safetensors").read_bytes()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    # resume from the step-2 checkpoint: the same last step, the same model, the same rows
    assert main(["train", "sft", "--out", str(out), "--resume", *common]) == 0
    assert (out / "model.safetensors").read_bytes() == first
    assert _no_time(map(json.loads, (out / "metrics.jsonl").read_text().splitlines())) == \
        _no_time(map(json.loads, rows))
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    capsys.readouterr()
    assert main(["train", "dpo", "--out", str(tmp_path / "dpo"), "--resume", *common]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "dpo").exists()  # nothing ran
    assert main(["train", "sft", "--out", str(tmp_path / "s"), "--save-every", "-1"]) == 2
