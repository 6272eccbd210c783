"""Supervised fine-tuning: token-mean negative log-likelihood of the completion tokens.

loss = -(1/N) sum_{completion tokens t} log pi(y_t | y_<t), N the number of completion tokens
(EOS included), from the trunk's hidden states and the head via ``fastpo.linear_token_logprobs``
(logits never materialised).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import fastpo

from .common import MetricsWriter, apply_gradients, check_dataset, linear_warmup, load_policy, run_loop, write_eval
from .distributed import all_sum, global_count, local_shards, shard_rows, world
from .rollout import encode_completions, head, hidden_states, pack


@dataclass
class SFTConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 250          # 0: only before and after training
    seed: int = 0
    num_threads: int | None = 1    # torch threads during train(); None leaves torch's setting


def sft_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean NLL, number of completion tokens) of one packed batch; under data parallel
    the mean is over the global batch's tokens (this rank's share of it)."""
    weight, bias = head(model)
    logp = fastpo.linear_token_logprobs(hidden_states(model, batch), weight, batch.labels, bias=bias)
    n = (batch.labels != -100).sum()
    total = global_count(n)
    return -logp.sum() / (n if total is None else total).clamp_min(1), n


class SFTTrainer:
    """``SFTTrainer(model_or_dir, tokenizer, dataset, config).train()``; dataset: (prompt,
    completion) string pairs (EOS is appended). ``evaluator(model, tokenizer) -> dict`` runs
    every ``eval_every`` steps. Under torchrun each rank takes its share of every batch
    (``distributed.py``)."""

    checkpoint_modules = ("model",)

    def __init__(self, model, tokenizer=None, dataset=(), config: SFTConfig | None = None, *,
                 evaluator=None, metrics_path: str | None = None):
        self.model, self.tokenizer = load_policy(model, tokenizer)
        self.dataset = check_dataset("SFTTrainer", dataset)
        self.config = config or SFTConfig()
        local_shards(None, self.config.batch_size, "SFTConfig.batch_size")  # splits over the ranks
        self.evaluator, self.metrics = evaluator, MetricsWriter(metrics_path)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.scheduler = linear_warmup(self.optimizer, self.config.warmup_steps)
        self.step = 0

    def batch(self, generator):
        idx = torch.randint(len(self.dataset), (self.config.batch_size,), generator=generator).tolist()
        idx = shard_rows(idx, world()[1], local_shards(None, len(idx), "SFTConfig.batch_size")[0])
        prompts, completions = zip(*(self.dataset[i] for i in idx))
        device = next(self.model.parameters()).device
        return pack(encode_completions(self.tokenizer, list(prompts), list(completions), device))

    def evaluate(self):
        return write_eval(self)

    def train_step(self, generator) -> dict:
        loss, n = sft_loss(self.model, self.batch(generator))
        apply_gradients(self, loss, list(self.model.parameters()))
        return {"loss": all_sum(loss.detach()).item(), "tokens": all_sum(n).item()}

    def train(self, **options):
        """``options``: ``checkpoint_dir``, ``save_every``, ``resume``, ``progress`` (``run_loop``)."""
        return run_loop(self, **options)
