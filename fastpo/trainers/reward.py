"""A Bradley-Terry reward model (Christiano et al. 2017; Ouyang et al. 2022, eq. 1) on
(prompt, chosen, rejected) pairs.

r(x, y) is an ``AutoModelForSequenceClassification`` with one label: the policy's trunk plus a
linear score head, read at the last non-pad token (EOS). Per step, on B pairs,
    loss = -(1/B) sum_i log sigmoid(r(x_i, y_i^chosen) - r(x_i, y_i^rejected)),
from one forward over the 2B rows (B chosen, then B rejected). ``RewardModelScorer`` turns a
saved reward model into a reward function ``fn(prompts, completions) -> list[float]`` for PPO.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import MetricsWriter, apply_gradients, check_dataset, check_tokenizer, load_policy, run_loop
from .distributed import all_sum, global_count, is_main, local_shards, shard_rows, weighted_mean, world
from .dpo import pair_batch
from .rollout import encode_completions, pack


@dataclass
class RewardConfig:
    steps: int = 400
    batch_size: int = 128          # pairs per step (64 at lr 3e-3: held-out pair accuracy 0.85-0.94)
    lr: float = 2e-3               # linear warmup, then linear decay to 0
    warmup_steps: int = 40
    max_grad_norm: float = 1.0
    eval_every: int = 100
    seed: int = 0
    num_threads: int | None = 1


def reward_model_from(policy, tokenizer):
    """A one-label ``AutoModelForSequenceClassification`` with the policy's trunk (copied) and a
    fresh score head; ``policy``: a causal-LM object or model dir."""
    from transformers import AutoModelForSequenceClassification

    policy, tokenizer = load_policy(policy, tokenizer)
    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(policy.base_model.state_dict())
    return model.to(next(policy.parameters()).device)


def scores(model, batch) -> torch.Tensor:
    """r(x, y) ``[B]`` of a packed batch (the score at the last non-pad token, EOS)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return out.logits.squeeze(-1).float()


def reward_loss(model, batch):
    """``(loss, chosen scores, rejected scores)`` of a pair batch (B chosen rows, then B rejected)."""
    r = scores(model, batch)
    chosen, rejected = r.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), chosen, rejected


class RewardModelScorer:
    """A saved reward model (dir, or model object + tokenizer) as a reward function."""

    def __init__(self, model, tokenizer=None, *, batch_size: int = 256):
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"reward model dir {path!r} does not exist (or has no config.json)")
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path)
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a reward model object (or pass a model dir)")
        check_tokenizer(tokenizer)
        self.model, self.tokenizer, self.batch_size = model.eval().requires_grad_(False), tokenizer, batch_size
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts, completions) -> list[float]:
        device, out = next(self.model.parameters()).device, []
        for i in range(0, len(prompts), self.batch_size):
            ro = encode_completions(self.tokenizer, prompts[i:i + self.batch_size],
                                    completions[i:i + self.batch_size], device)
            out += scores(self.model, pack(ro)).tolist()
        return out


@torch.no_grad()
def pair_accuracy(model, tokenizer, pairs, chunk: int = 512) -> dict:
    """Share of pairs with r(chosen) > r(rejected), and the mean margin."""
    was_training = model.training
    model.eval()
    device, margins = next(model.parameters()).device, []
    for i in range(0, len(pairs), chunk):
        _, c, r = reward_loss(model, pair_batch(tokenizer, pairs[i:i + chunk], device))
        margins.append(c - r)
    model.train(was_training)
    m = torch.cat(margins)
    return {"pair_accuracy": (m > 0).float().mean().item(), "margin": m.mean().item()}


class RewardTrainer:
    """``RewardTrainer(reward_model, tokenizer, pairs, config).train()``; reward_model: a
    one-label sequence-classification model (see ``reward_model_from``), pairs: (prompt, chosen,
    rejected) strings; ``eval_pairs``: held-out pairs for the eval rows. Under torchrun each
    rank takes its share of every batch."""

    checkpoint_modules = ("model",)

    def __init__(self, model, tokenizer, dataset=(), config: RewardConfig | None = None, *, eval_pairs=(),
                 metrics_path: str | None = None):
        check_tokenizer(tokenizer)
        if model.config.num_labels != 1:
            raise ValueError(f"RewardTrainer: the reward model needs num_labels=1, got {model.config.num_labels}")
        self.model, self.tokenizer = model, tokenizer
        self.dataset = check_dataset("RewardTrainer", dataset)
        self.eval_pairs = list(eval_pairs)
        self.config = cfg = config or RewardConfig()
        self.metrics = MetricsWriter(metrics_path)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 0
            self.optimizer, lambda s: min((s + 1) / max(1, cfg.warmup_steps), max(0.0, 1 - s / max(1, cfg.steps))))
        local_shards(None, self.pairs_per_step, "reward-model pairs per step")  # splits over the ranks
        self.step = 0

    @property
    def pairs_per_step(self) -> int:
        return min(self.config.batch_size, len(self.dataset))

    def evaluate(self):
        if self.eval_pairs and is_main():
            return self.metrics.write(type="eval", step=self.step,
                                      **pair_accuracy(self.model, self.tokenizer, self.eval_pairs))

    def train_step(self, generator) -> dict:
        device = next(self.model.parameters()).device
        idx = torch.randint(len(self.dataset), (self.pairs_per_step,), generator=generator)
        idx = shard_rows(idx, world()[1], local_shards(None, len(idx), "reward-model pairs per step")[0])
        loss, chosen, rejected = reward_loss(self.model, pair_batch(self.tokenizer, [self.dataset[i] for i in
                                                                                      idx.tolist()], device))
        pairs = global_count(len(idx))
        if pairs is not None:  # data parallel: this rank's share of the mean over the global pairs
            loss = loss * (len(idx) / pairs)
        apply_gradients(self, loss, list(self.model.parameters()))
        margin = (chosen - rejected).detach()
        means = weighted_mean({"pair_accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                               "chosen_score": chosen.detach().mean(), "rejected_score": rejected.detach().mean()},
                              torch.tensor(len(idx)))
        return {"loss": all_sum(loss.detach()).item(), **{k: v.item() for k, v in means.items()}}

    def train(self, **options):
        """``options``: ``checkpoint_dir``, ``save_every``, ``resume``, ``progress`` (``run_loop``)."""
        return run_loop(self, **options)
