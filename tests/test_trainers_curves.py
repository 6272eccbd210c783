"""curves.png (fastpo/trainers/curves.py), the progress bar (progress.py), and bad input that
reaches the trainers through the CLI (a model dir whose tokenizer has no EOS; a NaN reward in
PPO): clear errors before any step runs. CPU, offline."""
from __future__ import annotations

import io
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from fastpo.cli import main  # noqa: E402
from fastpo.trainers import PPOConfig, PPOTrainer, addition, build_model, build_tokenizer  # noqa: E402
from fastpo.trainers.curves import plot_comparison, plot_stage  # noqa: E402
from fastpo.trainers.progress import progress_bar  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [{"type": "eval", "step": 0, "time": 0.0, "accuracy": 0.1, "easy_accuracy": 0.2, "hard_accuracy": 0.0},
        {"type": "train", "step": 1, "time": 0.5, "loss": 2.0, "reward": 0.1, "kl": 0.0},
        {"type": "train", "step": 2, "time": 1.0, "loss": 1.5, "reward": 0.3, "kl": 0.01},
        {"type": "eval", "step": 2, "time": 1.2, "accuracy": 0.5, "easy_accuracy": 0.7, "hard_accuracy": 0.3}]


def test_stage_and_comparison_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_stage(ROWS, str(tmp_path / "curves.png"), "grpo") == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    for method in ("sft", "grpo"):
        (tmp_path / method).mkdir()
        (tmp_path / method / "metrics.jsonl").write_text("".join(f"{__import__('json').dumps(r)}\n" for r in ROWS))
    assert plot_comparison(str(tmp_path), ["sft", "grpo", "missing"], str(tmp_path / "all.png"))
    assert (tmp_path / "all.png").read_bytes()[:8] == PNG


def test_no_matplotlib_no_png(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert plot_stage(ROWS, str(tmp_path / "curves.png"), "sft") is None
    assert not (tmp_path / "curves.png").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty):
    out = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("COLUMNS", "200")  # one line: the metrics text is not wrapped
    with progress_bar(True, "GRPO", 0, 2) as bar:
        for row in ROWS:
            bar.update(row["step"], row)
    text = out.getvalue()
    if tty:
        assert "GRPO" in text and "2/2" in text and "reward 0.3" in text
    else:
        assert text == ""
    with progress_bar(False, "GRPO", 0, 2) as bar:  # asked off: nothing even on a terminal
        bar.update(1, ROWS[1])
    assert out.getvalue() == text


def test_cli_tokenizer_without_eos(tmp_path, capsys):
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "m")
    assert main(["train", "grpo", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "g")]) == 2
    assert "no EOS" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_ppo_nan_reward_fails_before_any_update():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = PPOTrainer(model, tokenizer, lambda p, c: [float("nan")] * len(p), addition.prompts(8, 0),
                         PPOConfig(steps=1, rollouts_per_step=4, eval_every=0))
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train()
    assert trainer.step == 0 and trainer.metrics.rows == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
