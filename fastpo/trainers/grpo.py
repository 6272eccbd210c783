"""GRPO (Shao et al. 2024, DeepSeekMath): sample a group of completions per prompt, score them,
normalise the rewards within each group, and take clipped policy-gradient steps with a KL to a
frozen reference.

Per step: G completions for each of P prompts (``model.generate``); A_i = (r_i - mean_g r) /
(std_g r + eps) (``fastpo.group_advantages``), broadcast to the completion tokens; then
``num_iterations`` x ``num_minibatches`` updates of ``fastpo.linear_policy_loss`` (the clipped
surrogate of PPO, eq. 7 of Schulman et al. 2017, plus ``kl_coef`` x the k3 estimator of
KL(pi || pi_ref), eq. 4 of DeepSeekMath) on the trunk's hidden states and the head. The old
policy's log-probs need their own forward only with several minibatches: otherwise the first
update's forward is the old policy, and its log-probs are taken from it (detached).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import fastpo

from .common import (MetricsWriter, apply_gradients, check_dataset, linear_warmup, load_policy, run_loop,
                     sum_rewards, write_eval)
from .distributed import all_sum, global_count, global_mean, global_mean_std, local_shards, weighted_mean
from .rollout import generate_shards, head, hidden_states, pack, shard_chunks


@dataclass
class GRPOConfig:
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    lr: float = 2e-4
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_iterations: int = 1        # updates per batch of rollouts (TRL's num_iterations)
    num_minibatches: int = 1
    advantage_eps: float = 1e-4
    loss: fastpo.PolicyLossConfig = field(
        default_factory=lambda: fastpo.PolicyLossConfig(kl_coef=0.02, kl_estimator="k3"))
    eval_every: int = 25
    seed: int = 0
    num_threads: int | None = 1


@torch.no_grad()
def token_logprobs(model, batch) -> torch.Tensor:
    weight, bias = head(model)
    return fastpo.linear_token_logprobs(hidden_states(model, batch), weight, batch.labels, bias=bias)


def grpo_loss(model, batch, advantages, old_logprobs=None, ref_logprobs=None,
              config: fastpo.PolicyLossConfig = fastpo.PolicyLossConfig(), num_tokens=None, num_sequences=None):
    """``(PolicyLossOutput, old_logprobs)`` for one packed batch; ``old_logprobs`` None: the
    batch is on-policy and they come, detached, from this very forward. ``num_tokens`` /
    ``num_sequences``: the global counts under data parallel."""
    weight, bias = head(model)
    hidden = hidden_states(model, batch)
    if old_logprobs is None:
        with torch.no_grad():
            old_logprobs = fastpo.linear_token_logprobs(hidden.detach(), weight.detach(), batch.labels,
                                                        bias=None if bias is None else bias.detach())
    out = fastpo.linear_policy_loss(hidden, weight, batch.labels, old_logprobs, advantages, bias=bias,
                                    ref_logprobs=ref_logprobs if config.kl_coef > 0 else None, config=config,
                                    num_tokens=num_tokens, num_sequences=num_sequences)
    return out, old_logprobs


class GRPOTrainer:
    """``GRPOTrainer(model_or_dir, tokenizer, reward_fns, prompts, config).train()``; reward
    functions ``fn(prompts, completions) -> list[float]`` are summed. Under torchrun each rank
    samples and trains on its shard of every step's prompts (whole groups); ``data_shards`` N
    in one process samples like an N-rank run (see ``rollout.generate_shards``)."""

    checkpoint_modules = ("model",)

    def __init__(self, model, tokenizer=None, reward_fns=(), dataset=(), config: GRPOConfig | None = None, *,
                 evaluator=None, metrics_path: str | None = None, data_shards: int | None = None):
        self.model, self.tokenizer = load_policy(model, tokenizer)
        self.reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not self.reward_fns:
            raise ValueError("GRPOTrainer: pass at least one reward function fn(prompts, completions)")
        self.dataset = check_dataset("GRPOTrainer", dataset)
        self.config = cfg = config or GRPOConfig()
        if (cfg.prompts_per_step * cfg.group_size) % cfg.num_minibatches:
            raise ValueError("GRPOTrainer: prompts_per_step * group_size must split into num_minibatches")
        self.data_shards = data_shards
        shards = len(local_shards(data_shards, cfg.prompts_per_step, "GRPOConfig.prompts_per_step"))
        if (cfg.prompts_per_step // shards * cfg.group_size) % cfg.num_minibatches:
            raise ValueError("GRPOTrainer: each data shard's rows must split into num_minibatches")
        self.reference = None
        if cfg.loss.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.evaluator, self.metrics = evaluator, MetricsWriter(metrics_path)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scheduler = linear_warmup(self.optimizer, cfg.warmup_steps)
        self.step = 0

    def evaluate(self):
        return write_eval(self)

    def rollout(self, generator):
        """This rank's prompts, rollout (``group_size`` rows per prompt), rewards and local shards."""
        cfg = self.config
        idx = torch.randint(len(self.dataset), (cfg.prompts_per_step,), generator=generator).tolist()
        prompts, ro, shards = generate_shards(self.model, self.tokenizer, [self.dataset[i] for i in idx],
                                              self.data_shards, generator, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature, num_return_sequences=cfg.group_size)
        repeated = [p for p in prompts for _ in range(cfg.group_size)]
        rewards = sum_rewards(self.reward_fns, repeated, ro.texts)
        return ro, rewards, shards

    def train_step(self, generator) -> dict:
        cfg = self.config
        ro, rewards, shards = self.rollout(generator)
        batch = pack(ro)
        mask = batch.labels != -100
        adv = fastpo.group_advantages(rewards, cfg.group_size, eps=cfg.advantage_eps)
        adv = adv.to(mask.device)[:, None] * mask
        ref = token_logprobs(self.reference, batch) if self.reference is not None else None
        chunks = shard_chunks(batch.input_ids.shape[0], shards, cfg.num_minibatches)
        old = token_logprobs(self.model, batch) if cfg.num_minibatches > 1 else None
        losses, metrics = [], []
        params = list(self.model.parameters())
        for _ in range(cfg.num_iterations):
            for ids in chunks:
                kept = mask[ids].sum()
                out, old_mb = grpo_loss(self.model, batch.rows(ids), adv[ids],
                                        None if old is None else old[ids],
                                        None if ref is None else ref[ids], cfg.loss,
                                        num_tokens=global_count(kept), num_sequences=global_count(len(ids)))
                if old is None:  # one minibatch: this first forward was the old policy
                    old = old_mb
                apply_gradients(self, out.loss, params)
                losses.append(all_sum(out.loss.detach()).item())
                metrics.append(weighted_mean(out.metrics, kept))
        first = metrics[0]  # statistics of the on-policy update: ratio 1, the KL of the rollout
        reward_mean, reward_std = global_mean_std(rewards)
        return {"loss": sum(losses) / len(losses), "reward": reward_mean,
                "reward_std": reward_std, "kl": first["ref_kl"].item(),
                "clip_frac_low": metrics[-1]["clip_frac_low"].item(),
                "clip_frac_high": metrics[-1]["clip_frac_high"].item(),
                "ratio_mean": metrics[-1]["ratio_mean"].item(),
                "completion_length": global_mean(mask.sum(-1).float())}

    def train(self, **options):
        """``options``: ``checkpoint_dir``, ``save_every``, ``resume``, ``progress`` (``run_loop``)."""
        return run_loop(self, **options)
