"""Data parallel trainers (fastpo/trainers/distributed.py) over gloo on CPU: in a 2-process run
of a few steps of every trainer, the first update's gradient (summed over the ranks, clipped) is
the 1-process gradient on the same global batch, the final parameters are the 1-process ones,
and the metrics rows match (fp32 tolerance: only the order of the sums differs). The reward
model's parameters are the exception, checked through its gradient only: with a fresh score
head some trunk gradients are ~0, where AdamW's first step lr * g / (|g| + eps) turns fp32
rounding of g into a visible fraction of a step (4e-5 relative in one tensor after one step).
For the sampling trainers (GRPO, PPO) the 1-process run uses ``data_shards=2``, which samples each shard
with its own seed exactly as the two ranks do. Exact resume on 2 ranks: from rank 0's checkpoint
every rank ends bitwise where the uninterrupted run ended. Plus ``fastpo train`` under
torchrun: rank 0 alone writes the run dir. One spawn does every trainer (process start-up dominates the cost)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from fastpo.trainers import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer,  # noqa: E402
                             RewardConfig, RewardTrainer, SFTConfig, SFTTrainer, addition, build_model,
                             build_tokenizer, reward_model_from)
from test_vocab_parallel import _launch  # noqa: E402 (the shared spawn harness)

KINDS = ("sft", "grpo", "ppo", "dpo", "rm")
WORLD = 2
STEPS = 3
TOL = 1e-5  # relative, per tensor: fp32 sums in another order
EXACT_FIELDS = ("step", "type", "tokens", "reward", "accuracy", "easy_accuracy", "hard_accuracy")


def _shaped_reward(prompts, completions):
    """Varies on an untrained model's samples (the task reward is 0 on all of them)."""
    return [len(c) / 4 + c.count("1") for c in completions]


def _evaluator(model, tokenizer):
    return addition.evaluate(model, tokenizer, n=16)


def _trainer(kind: str, data_shards=None):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    torch.manual_seed(0)
    common = dict(steps=STEPS, eval_every=2, seed=1)
    if kind == "sft":
        return SFTTrainer(model, tokenizer, addition.demonstrations(64, 0), SFTConfig(batch_size=8, **common),
                          evaluator=_evaluator)
    if kind == "grpo":  # 2 minibatches: per-minibatch global token counts
        return GRPOTrainer(model, tokenizer, _shaped_reward, addition.prompts(64, 0),
                           GRPOConfig(prompts_per_step=4, group_size=4, num_minibatches=2, **common),
                           evaluator=_evaluator, data_shards=data_shards)
    if kind == "ppo":  # global whitening, value loss and per-minibatch counts
        return PPOTrainer(model, tokenizer, _shaped_reward, addition.prompts(64, 0),
                          PPOConfig(rollouts_per_step=8, **common), evaluator=_evaluator, data_shards=data_shards)
    if kind == "dpo":
        pairs = [(p, addition.answer_of(*map(int, p[:-1].split("+"))), "0" + p[1:3])
                 for p in addition.prompts(32, 3)]
        return DPOTrainer(model, tokenizer, pairs, DPOConfig(batch_size=8, **common), evaluator=_evaluator)
    return RewardTrainer(reward_model_from(model, tokenizer), tokenizer, addition.preference_pairs(64, 0),
                         RewardConfig(batch_size=8, **common), eval_pairs=addition.preference_pairs(16, 9))


def _params(trainer) -> dict:
    return {f"{name}.{k}": v.detach().clone() for name in trainer.checkpoint_modules
            for k, v in getattr(trainer, name).state_dict().items()}


def _record_first_gradient(trainer) -> dict:
    """The gradients the optimizer's first step sees (after the all-reduce and the clip)."""
    seen, step = {}, trainer.optimizer.step

    @functools.wraps(step)  # keeps the scheduler's marker on the wrapped step
    def recording(*args, **kwargs):
        if not seen:
            seen.update({f"{name}.{k}": p.grad.detach().clone() for name in trainer.checkpoint_modules
                         for k, p in getattr(trainer, name).named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return seen


def _run(trainer, **options) -> dict:
    grads = _record_first_gradient(trainer)
    rows = trainer.train(**options)
    return {"params": _params(trainer), "grads": grads, "rows": rows}


RESUMED = ("sft", "grpo", "ppo")  # data order, and sampling with per-shard seeds


def _run_and_resume(kind: str, ckpt: str) -> dict:
    """The run, writing a checkpoint at step 2 (rank 0 alone writes); then a fresh trainer on
    every rank resumes from it (each rank loads rank 0's file) and runs step 3 again."""
    result = _run(_trainer(kind), checkpoint_dir=ckpt, save_every=2)
    if kind in RESUMED:
        dist.barrier()  # rank 0's checkpoint is on disk
        resumed = _trainer(kind)
        rows = resumed.train(checkpoint_dir=ckpt, resume=True)
        result["resumed"] = {"params": _params(resumed), "rows": rows}
    return result


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {kind: _run_and_resume(kind, os.path.join(out, f"ckpt-{kind}")) for kind in KINDS}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still communicates
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _launch(_worker, WORLD, out, str(out), timeout=240.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, kind):
    single = _run(_trainer(kind, data_shards=WORLD) if kind in ("grpo", "ppo") else _trainer(kind))
    start = _params(_trainer(kind))
    assert any(not torch.equal(single["params"][k], start[k]) for k in start)  # it trained
    for what in ("grads", "params") if kind != "rm" else ("grads",):
        want = single[what]
        ranks = [r[kind][what] for r in two_ranks]
        assert ranks[0].keys() == want.keys()
        for k in want:
            assert torch.equal(ranks[0][k], ranks[1][k]), f"{kind}: {what} {k} differ between the ranks"
            err = _rel(ranks[0][k], want[k])
            assert err <= TOL, f"{kind}: {what} {k} rel err {err:.3g} vs the 1-process run"
    rows, got = single["rows"], two_ranks[0][kind]["rows"]  # rank 0 evaluates; rank 1 only trains
    assert [r for r in two_ranks[1][kind]["rows"] if r["type"] == "eval"] == []
    assert len(got) == len(rows)
    for g, w in zip(got, rows):
        assert g.keys() == w.keys()
        for key in g:
            if key in EXACT_FIELDS:
                assert g[key] == w[key], (kind, key, g, w)
            elif isinstance(w[key], float) and key != "time":
                assert abs(g[key] - w[key]) <= 1e-4 * max(1.0, abs(w[key])), (kind, key, g[key], w[key])


@pytest.mark.parametrize("kind", RESUMED)
def test_two_ranks_resume_exactly(two_ranks, kind):
    """Resumed on both ranks from rank 0's step-2 checkpoint, a run ends bitwise where the
    uninterrupted 2-rank run ended, on each rank, and rank 0 (the one that writes them) has
    the same metrics rows (but time)."""
    for rank, result in enumerate(two_ranks):
        full, resumed = result[kind], result[kind]["resumed"]
        for k, v in full["params"].items():
            assert torch.equal(resumed["params"][k], v), f"{kind} rank {rank}: {k} differs after resume"
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert drop(two_ranks[0][kind]["resumed"]["rows"]) == drop(two_ranks[0][kind]["rows"]), f"{kind}: rows differ"


def test_data_shards_must_split_the_batch():
    with pytest.raises(ValueError, match="must split evenly into 3 data shards"):
        tokenizer = build_tokenizer()
        GRPOTrainer(build_model(tokenizer), tokenizer, _shaped_reward, addition.prompts(8, 0),
                    GRPOConfig(prompts_per_step=4), data_shards=3)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on localhost")
def test_cli_under_torchrun_rank0_writes(tmp_path):
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastpo.cli", "train", "sft", "--out", str(out), "--steps", "3", "--eval-prompts", "16",
           "--eval-every", "0", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sft: 3 steps") == 1, proc.stdout  # rank 0 alone reports
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3]  # one writer: each row once
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 3]
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["after"]["step"] == 3
