"""Small pieces every trainer uses: loading, input checks, the metrics writer, threads, the
optimizer step and the training loop (with checkpoints and the progress bar)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from . import checkpoint
from .distributed import all_reduce_grads, is_main
from .progress import progress_bar


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
    """Rows of ``metrics.jsonl`` (one per step, plus eval rows); None path: kept in memory.
    Under data parallel only rank 0 writes the file."""

    def __init__(self, path: str | None = None):
        self.path = path if is_main() else None
        self.rows, self.start = [], time.perf_counter()
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            open(self.path, "w").close()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, **row) -> dict:
        row = {"time": round(self.elapsed(), 4), **row}
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def restore(self, rows: list, elapsed: float) -> None:
        """Continue after a checkpoint: its rows (the file rewritten to hold exactly them, dropping
        rows of steps after it) and its clock."""
        self.rows, self.start = list(rows), time.perf_counter() - elapsed
        if self.path:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)


def linear_warmup(optimizer, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))


def write_eval(trainer):
    """One ``type="eval"`` metrics row from ``trainer.evaluator(model, tokenizer)`` (None without
    an evaluator, and on every rank but 0 under data parallel)."""
    if trainer.evaluator is not None and is_main():
        return trainer.metrics.write(type="eval", step=trainer.step,
                                     **trainer.evaluator(trainer.model, trainer.tokenizer))
    return None


def apply_gradients(trainer, loss: torch.Tensor, params: list) -> None:
    """One optimizer step on ``loss``: backward, the gradients summed over data-parallel ranks,
    clipped to ``config.max_grad_norm``, then the optimizer and the scheduler."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_grads(params)
    torch.nn.utils.clip_grad_norm_(params, trainer.config.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()


def run_loop(trainer, *, checkpoint_dir: str | None = None, save_every: int = 0, resume: bool = False,
             progress: bool = False):
    """Every trainer's loop: ``config.num_threads`` torch threads, seeded data order and sampling
    (``trainer.train_step(generator)`` draws from ``generator``; ``model.generate`` from torch's
    seeded global RNG), an evaluation before, every ``config.eval_every`` steps and after, and one
    metrics row per step. ``save_every`` K > 0: a checkpoint into ``checkpoint_dir`` every K steps
    (not at the last step: the final model is the run's output); ``resume``: continue from the
    checkpoint there (an error if there is none). ``progress``: a live bar on a terminal.
    Returns the metrics rows."""
    cfg = trainer.config
    if save_every < 0:
        raise ValueError(f"save_every must be >= 0, got {save_every}")
    if (save_every or resume) and checkpoint_dir is None:
        raise ValueError("save_every / resume need a checkpoint_dir")
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch_threads(cfg.num_threads):
        trainer.model.train()
        if resume:
            checkpoint.load(trainer, generator, checkpoint_dir)
        else:
            torch.manual_seed(cfg.seed)
            trainer.evaluate()
        name = type(trainer).__name__.removesuffix("Trainer")
        with progress_bar(progress and is_main(), name, trainer.step, cfg.steps) as bar:
            while trainer.step < cfg.steps:
                lr = trainer.scheduler.get_last_lr()[0]
                row = trainer.train_step(generator)
                trainer.step += 1
                bar.update(trainer.step, trainer.metrics.write(type="train", step=trainer.step, lr=lr, **row))
                if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.steps:
                    bar.update(trainer.step, trainer.evaluate() or {})
                if save_every and trainer.step % save_every == 0 and trainer.step < cfg.steps and is_main():
                    checkpoint.save(trainer, generator, checkpoint_dir)
        trainer.evaluate()
    return trainer.metrics.rows
