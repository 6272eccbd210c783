"""Small pieces every trainer uses: loading, input checks, the metrics writer, threads."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch


def load_policy(model, tokenizer=None):
    """``(model, tokenizer)`` from a local model dir (``AutoModelForCausalLM`` +
    ``AutoTokenizer``) or from a model object and its tokenizer; checks the tokenizer."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model dir {path!r} does not exist")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with a model object (or pass a model dir)")
    check_tokenizer(tokenizer)
    return model, tokenizer


def check_tokenizer(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: completions could never end "
                         "(set tokenizer.eos_token)")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token, distinct from EOS)")


def check_dataset(name: str, data) -> list:
    data = list(data)
    if not data:
        raise ValueError(f"{name}: the dataset is empty")
    return data


def call_reward(fn, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """``fn(prompts, completions)`` as a float32 tensor ``[B]``; a clear error for a wrong
    length or a non-finite value."""
    name = getattr(fn, "__name__", repr(fn))
    out = list(fn(prompts, completions))
    if len(out) != len(prompts):
        raise ValueError(f"reward function {name} returned {len(out)} rewards for {len(prompts)} completions")
    values = [float(x) for x in out]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"reward function {name} returned non-finite rewards (NaN or inf) at "
                         f"index(es) {bad[:8]}")
    return torch.tensor(values, dtype=torch.float32)


def sum_rewards(fns, prompts, completions) -> torch.Tensor:
    total = torch.zeros(len(prompts))
    for fn in fns:
        total += call_reward(fn, prompts, completions)
    return total


@contextlib.contextmanager
def torch_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the duration (None: leave as is). One thread is the
    default on CPU: tiny models on a shared box run many times slower with more."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MetricsWriter:
    """Rows of ``metrics.jsonl`` (one per step, plus eval rows); None path: kept in memory."""

    def __init__(self, path: str | None = None):
        self.path, self.rows, self.start = path, [], time.perf_counter()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def write(self, **row) -> dict:
        row = {"time": round(time.perf_counter() - self.start, 4), **row}
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def linear_warmup(optimizer, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))


def write_eval(trainer):
    """One ``type="eval"`` metrics row from ``trainer.evaluator(model, tokenizer)`` (None without
    an evaluator)."""
    if trainer.evaluator is not None:
        return trainer.metrics.write(type="eval", step=trainer.step,
                                     **trainer.evaluator(trainer.model, trainer.tokenizer))
    return None


def run_rl_loop(trainer):
    """The sampling trainers' loop (GRPO, PPO): seeded sampling, ``config.num_threads`` torch
    threads, an evaluation before, every ``config.eval_every`` steps and after, one metrics row
    per ``trainer.train_step(generator)``. Returns the metrics rows."""
    cfg = trainer.config
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # sampling in model.generate
    with torch_threads(cfg.num_threads):
        trainer.model.train()
        trainer.evaluate()
        while trainer.step < cfg.steps:
            lr = trainer.scheduler.get_last_lr()[0]
            row = trainer.train_step(generator)
            trainer.step += 1
            trainer.metrics.write(type="train", step=trainer.step, lr=lr, **row)
            if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps:
                trainer.evaluate()
        trainer.evaluate()
    return trainer.metrics.rows
