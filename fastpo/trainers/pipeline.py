"""``fastpo train STAGE``: one stage of the default pipeline (addition task, tiny Llama) into a dir.

Each stage writes ``<out>/`` = a Hugging Face model dir (``AutoModelForCausalLM`` +
``AutoTokenizer``; for rm ``AutoModelForSequenceClassification``; ppo adds ``value_head.pt``),
``metrics.jsonl`` (a row per step plus eval rows) and ``summary.json``. rm, ppo, grpo and dpo
start from ``--model`` or else ``<out parent>/sft``, trained first if missing. ppo optimises the
task reward, or with ``reward_model`` a learned reward model's score (the task reward is logged
beside it as ``task_reward``). ``save_every`` K writes ``<out>/checkpoint/state.pt`` every K
steps and ``resume`` continues from it exactly (``checkpoint.py``); ``curves.png`` is drawn
when matplotlib is installed. Under ``torchrun`` every rank runs the stage data-parallel
(``distributed.py``); only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import torch

from . import addition, checkpoint
from .common import load_policy, torch_threads
from .curves import plot_comparison, plot_stage
from .distributed import barrier, init_from_env, is_main
from .default_model import build_model, build_tokenizer
from .dpo import DPOConfig, DPOTrainer, sample_preference_pairs
from .grpo import GRPOConfig, GRPOTrainer
from .ppo import PPOConfig, PPOTrainer
from .reward import RewardConfig, RewardModelScorer, RewardTrainer, reward_model_from
from .sft import SFTConfig, SFTTrainer

STAGES = ("sft", "rm", "ppo", "grpo", "dpo")
RM_EVAL_PAIRS = 1000
SFT_EXAMPLES = 20000
DPO_PROMPTS = 1000
DPO_SAMPLE_TEMPERATURE = 1.5  # wrong samples on easy problems too: pairs that cover both kinds


def _override(config, steps, seed, eval_every):
    changes = {"seed": seed}
    if steps is not None:
        changes["steps"] = steps
    if eval_every is not None:
        changes["eval_every"] = eval_every
    return dataclasses.replace(config, **changes)


def run_stage(stage: str, out: str, *, model: str | None = None, steps: int | None = None, seed: int = 0,
              sft_steps: int | None = None, eval_prompts: int = 400, eval_every: int | None = None,
              reward_model: str | None = None, save_every: int = 0, resume: bool = False,
              progress: bool = False) -> dict:
    """Train one stage into ``out`` and return its summary (also written to summary.json).
    Everything (sampling and evaluation included) runs with one torch thread on CPU.
    ``save_every`` / ``resume`` / ``progress``: see ``common.run_loop``; ``resume`` without a
    checkpoint in ``out/checkpoint`` is an error (raised before anything runs)."""
    device = init_from_env()  # torchrun: join the process group (a no-op otherwise)
    with torch_threads(None if torch.cuda.is_available() else 1):
        return _run_stage(stage, out, model=model, steps=steps, seed=seed, sft_steps=sft_steps,
                          eval_prompts=eval_prompts, eval_every=eval_every, reward_model=reward_model,
                          device=device, options=dict(save_every=save_every, resume=resume, progress=progress))


def _run_stage(stage, out, *, model, steps, seed, sft_steps, eval_prompts, eval_every, reward_model, device,
               options) -> dict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if steps is not None and steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
    if options["save_every"] < 0:
        raise ValueError(f"--save-every must be >= 0, got {options['save_every']}")
    if reward_model is not None and stage != "ppo":
        raise ValueError(f"--reward-model is for the ppo stage, not {stage!r}")
    ckpt = os.path.join(out, "checkpoint")
    if options["resume"] and not checkpoint.exists(ckpt):
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt} (run with --save-every K to write one, "
                                "or without --resume to start from scratch)")
    scorer = RewardModelScorer(reward_model) if reward_model is not None else None  # checked before any step
    evaluator = functools.partial(addition.evaluate, n=eval_prompts)
    if stage == "sft":
        if model is None:
            tokenizer = build_tokenizer()
            policy = build_model(tokenizer, seed=seed)
        else:
            policy, tokenizer = load_policy(model)
    else:
        if model is None:
            model = os.path.join(os.path.dirname(os.path.abspath(out)), "sft")
            if not os.path.isfile(os.path.join(model, "summary.json")):
                run_stage("sft", model, steps=sft_steps, seed=seed, eval_prompts=eval_prompts,
                          progress=options["progress"])
        policy, tokenizer = load_policy(model)
    if device is not None:
        policy = policy.to(device)
        if scorer is not None:
            scorer.model.to(device)
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "metrics.jsonl")
    start = time.perf_counter()
    if stage == "sft":
        config = _override(SFTConfig(), steps, seed, eval_every)
        trainer = SFTTrainer(policy, tokenizer, addition.demonstrations(SFT_EXAMPLES, seed), config,
                             evaluator=evaluator, metrics_path=metrics)
    elif stage == "rm":
        config = _override(RewardConfig(), steps, seed, eval_every)
        trainer = RewardTrainer(reward_model_from(policy, tokenizer), tokenizer,
                                addition.preference_pairs(SFT_EXAMPLES, seed + 11), config,
                                eval_pairs=addition.preference_pairs(RM_EVAL_PAIRS, 54321), metrics_path=metrics)
    elif stage == "ppo":
        config = _override(PPOConfig(), steps, seed, eval_every)
        rewards, monitors = addition.addition_reward, None
        if scorer is not None:
            rewards, monitors = scorer, {"task_reward": addition.addition_reward}
        trainer = PPOTrainer(policy, tokenizer, rewards, addition.prompts(SFT_EXAMPLES, seed + 5), config,
                             monitor_fns=monitors, evaluator=evaluator, metrics_path=metrics)
    elif stage == "grpo":
        config = _override(GRPOConfig(), steps, seed, eval_every)
        trainer = GRPOTrainer(policy, tokenizer, addition.addition_reward, addition.prompts(SFT_EXAMPLES, seed + 7),
                              config, evaluator=evaluator, metrics_path=metrics)
    else:
        config = _override(DPOConfig(), steps, seed, eval_every)
        pairs = sample_preference_pairs(policy, tokenizer, addition.prompts(DPO_PROMPTS, seed + 3),
                                        addition.addition_reward, temperature=DPO_SAMPLE_TEMPERATURE)
        trainer = DPOTrainer(policy, tokenizer, pairs, config, evaluator=evaluator, metrics_path=metrics)
    rows = trainer.train(checkpoint_dir=ckpt, **options)
    seconds = time.perf_counter() - start
    summary = {"stage": stage, "steps": trainer.step, "seconds": round(seconds, 2), "seed": seed,
               "model_from": model or "default (built in code)",
               "reward_model": reward_model, "threads": config.num_threads, "resumed": options["resume"],
               "before": next((r for r in rows if r["type"] == "eval"), None),
               "after": next((r for r in reversed(rows) if r["type"] == "eval"), None),
               "config": dataclasses.asdict(config)}
    if is_main():
        _write_stage(stage, out, trainer, policy, tokenizer, rows, summary)
    barrier()  # the other ranks may load this dir next
    return summary


def _write_stage(stage, out, trainer, policy, tokenizer, rows, summary) -> None:
    (trainer.model if stage == "rm" else policy).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if stage == "ppo":
        trainer.save_value_head(os.path.join(out, "value_head.pt"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_stage(rows, os.path.join(out, "curves.png"), stage)


def run_all(out: str, *, steps: int | None = None, seed: int = 0, sft_steps: int | None = None,
            eval_prompts: int = 400, eval_every: int | None = None, save_every: int = 0, resume: bool = False,
            progress: bool = False) -> dict:
    """Every stage into ``out/<stage>`` (sft first: the others start from it), and ``out/ppo_rm``
    (PPO optimising the reward model's score, the task reward only logged), then the report:
    per method steps, seconds, accuracy before -> after and hard-problem accuracy (the reward
    model: held-out pair accuracy), written to ``out/report.json``, and ``out/curves.png``
    comparing the methods (matplotlib). ``steps`` overrides every stage but sft (``sft_steps``).
    ``resume``: stages with a summary.json are kept, a stage with a checkpoint continues from
    it, the rest run from scratch."""
    rows = []
    for stage in STAGES + ("ppo_rm",):  # ppo_rm: PPO on the learned reward model's score
        stage_out = os.path.join(out, stage)
        done = os.path.join(stage_out, "summary.json")
        if resume and os.path.isfile(done):
            with open(done) as f:
                summary = json.load(f)
        else:
            summary = run_stage("ppo" if stage == "ppo_rm" else stage, stage_out,
                                model=os.path.join(out, "sft") if stage == "ppo_rm" else None,
                                reward_model=os.path.join(out, "rm") if stage == "ppo_rm" else None,
                                steps=sft_steps if stage == "sft" else steps,
                                seed=seed, eval_prompts=eval_prompts, eval_every=eval_every, save_every=save_every,
                                resume=resume and checkpoint.exists(os.path.join(stage_out, "checkpoint")),
                                progress=progress)
        before, after = summary["before"] or {}, summary["after"] or {}
        key = "pair_accuracy" if stage == "rm" else "accuracy"
        rows.append({"method": stage, "steps": summary["steps"], "seconds": summary["seconds"], "metric": key,
                     "before": before.get(key), "after": after.get(key), "hard_accuracy": after.get("hard_accuracy")})
    report = {"seed": seed, "rows": rows}
    if is_main():
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        plot_comparison(out, [r["method"] for r in rows if r["method"] != "rm"], os.path.join(out, "curves.png"))
    return report


def format_report(report: dict) -> str:
    def num(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{'method':<7} {'steps':>5} {'seconds':>8}  {'accuracy before -> after':<26} {'hard':>6}"]
    for r in report["rows"]:
        what = f"{num(r['before'])} -> {num(r['after'])}" + (" (pairs)" if r["metric"] == "pair_accuracy" else "")
        lines.append(f"{r['method']:<7} {r['steps']:>5} {r['seconds']:>8.1f}  {what:<26} {num(r['hard_accuracy']):>6}")
    return "\n".join(lines)
