"""``curves.png``: a stage's training curves, and the methods compared (``fastpo train all``).

Drawn with matplotlib's object API (``Figure``, no pyplot state) when matplotlib is installed
(the ``plot`` extra); without it nothing is drawn and the functions return None.
"""
from __future__ import annotations

import json
import os

TRAIN_FIELDS = {"sft": ("loss",), "rm": ("loss", "pair_accuracy"), "ppo": ("loss", "reward", "kl"),
                "grpo": ("loss", "reward", "kl"), "dpo": ("loss", "reward_accuracy", "margin")}
EVAL_FIELDS = {"rm": ("pair_accuracy",)}
DEFAULT_EVAL = ("accuracy", "easy_accuracy", "hard_accuracy")


def _figure(columns: int):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(5.5 * columns, 4.0), layout="constrained")
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _series(rows, kind, field, x="step"):
    pts = [(r[x], r[field]) for r in rows if r.get("type") == kind and isinstance(r.get(field), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_stage(rows: list, path: str, stage: str) -> str | None:
    """Train fields per step (one axis each) and the eval
    accuracies per step (right) of one stage's metrics rows."""
    made = _figure(len(TRAIN_FIELDS.get(stage, ("loss",))) + 1)
    if made is None:
        return None
    fig, axes = made
    for ax, field in zip(axes, TRAIN_FIELDS.get(stage, ("loss",))):
        ax.plot(*_series(rows, "train", field), lw=1)
        ax.set(title=f"{stage}: {field}", xlabel="step")
    for field in EVAL_FIELDS.get(stage, DEFAULT_EVAL):
        ax = axes[-1]
        ax.plot(*_series(rows, "eval", field), marker="o", label=field)
    axes[-1].set(title=f"{stage}: evaluation", xlabel="step", ylim=(-0.02, 1.02))
    axes[-1].legend()
    fig.savefig(path, dpi=100)
    return path


def plot_comparison(out: str, methods: list[str], path: str) -> str | None:
    """Greedy accuracy of each method (``out/<method>/metrics.jsonl``) against steps and
    against seconds of training: the methods side by side."""
    made = _figure(2)
    if made is None:
        return None
    fig, (by_step, by_time) = made
    for method in methods:
        metrics = os.path.join(out, method, "metrics.jsonl")
        if not os.path.isfile(metrics):
            continue
        with open(metrics) as f:
            rows = [json.loads(line) for line in f]
        by_step.plot(*_series(rows, "eval", "accuracy"), marker="o", label=method)
        by_time.plot(*_series(rows, "eval", "accuracy", x="time"), marker="o", label=method)
    by_step.set(title="greedy accuracy vs step", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    by_time.set(title="greedy accuracy vs time", xlabel="seconds (evaluation included)", ylim=(-0.02, 1.02))
    by_step.legend()
    fig.savefig(path, dpi=100)
    return path
