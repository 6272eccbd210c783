"""``fastpo train STAGE``: one stage of the default pipeline (addition task, tiny Llama) into a dir.

Each stage writes ``<out>/`` = a Hugging Face model dir (``AutoModelForCausalLM`` +
``AutoTokenizer``), ``metrics.jsonl`` (a row per step plus eval rows) and ``summary.json``.
grpo and dpo start from ``--model`` or else ``<out parent>/sft``, trained first if missing.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import torch

from . import addition
from .common import load_policy, torch_threads
from .default_model import build_model, build_tokenizer
from .dpo import DPOConfig, DPOTrainer, sample_preference_pairs
from .grpo import GRPOConfig, GRPOTrainer
from .sft import SFTConfig, SFTTrainer

STAGES = ("sft", "grpo", "dpo")
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
              sft_steps: int | None = None, eval_prompts: int = 400, eval_every: int | None = None) -> dict:
    """Train one stage into ``out`` and return its summary (also written to summary.json).
    Everything (sampling and evaluation included) runs with one torch thread on CPU."""
    with torch_threads(None if torch.cuda.is_available() else 1):
        return _run_stage(stage, out, model=model, steps=steps, seed=seed, sft_steps=sft_steps,
                          eval_prompts=eval_prompts, eval_every=eval_every)


def _run_stage(stage, out, *, model, steps, seed, sft_steps, eval_prompts, eval_every) -> dict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if steps is not None and steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
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
                run_stage("sft", model, steps=sft_steps, seed=seed, eval_prompts=eval_prompts)
        policy, tokenizer = load_policy(model)
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "metrics.jsonl")
    start = time.perf_counter()
    if stage == "sft":
        config = _override(SFTConfig(), steps, seed, eval_every)
        trainer = SFTTrainer(policy, tokenizer, addition.demonstrations(SFT_EXAMPLES, seed), config,
                             evaluator=evaluator, metrics_path=metrics)
    elif stage == "grpo":
        config = _override(GRPOConfig(), steps, seed, eval_every)
        trainer = GRPOTrainer(policy, tokenizer, addition.addition_reward, addition.prompts(SFT_EXAMPLES, seed + 7),
                              config, evaluator=evaluator, metrics_path=metrics)
    else:
        config = _override(DPOConfig(), steps, seed, eval_every)
        pairs = sample_preference_pairs(policy, tokenizer, addition.prompts(DPO_PROMPTS, seed + 3),
                                        addition.addition_reward, temperature=DPO_SAMPLE_TEMPERATURE)
        trainer = DPOTrainer(policy, tokenizer, pairs, config, evaluator=evaluator, metrics_path=metrics)
    rows = trainer.train()
    seconds = time.perf_counter() - start
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    evals = [r for r in rows if r["type"] == "eval"]
    summary = {"stage": stage, "steps": trainer.step, "seconds": round(seconds, 2), "seed": seed,
               "model_from": model or "default (built in code)", "threads": config.num_threads,
               "before": evals[0] if evals else None, "after": evals[-1] if evals else None,
               "config": dataclasses.asdict(config)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
