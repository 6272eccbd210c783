"""PPO (Schulman et al. 2017) for language models, in the RLHF form of Ziegler et al. 2019 /
Ouyang et al. 2022: maximise r(x, y) - beta * KL(pi || pi_ref) with a value function and GAE.

Per step: one completion for each of B prompts (``model.generate``), a scalar score per
completion (reward functions, or a reward model), then one no-grad forward of the policy (the
old policy: log-probs and values) and one of the frozen reference. Per-token rewards
(``fastpo.token_rewards``): -kl_coef * (log pi_old - log pi_ref) at every completion token, plus
the score at the last one (EOS). ``fastpo.gae`` (gamma, lam) gives advantages and returns; the
advantages are whitened over the batch (``fastpo.whiten``). Then ``epochs`` x ``minibatches``
updates of
    loss = fastpo.linear_policy_loss(...)                 (clipped surrogate, eq. 7)
         + vf_coef * fastpo.value_loss(...)               (clipped value loss)
both from the same trunk forward: the value head is an ``nn.Linear(hidden, 1)`` on the policy's
last hidden states (saved as ``value_head.pt`` beside the model), the policy term goes through
the output head without materialising the logits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import fastpo

from .common import (MetricsWriter, apply_gradients, call_reward, check_dataset, linear_warmup, load_policy,
                     run_loop, sum_rewards, write_eval)
from .distributed import all_sum, global_count, global_mean, local_shards, weighted_mean, whiten
from .rollout import IGNORE_INDEX, generate_shards, head, hidden_states, pack, shard_chunks


@dataclass
class PPOConfig:
    steps: int = 100
    rollouts_per_step: int = 128
    max_new_tokens: int = 4
    temperature: float = 1.0
    lr: float = 2e-4
    value_lr: float = 1e-3         # the value head's own learning rate (the trunk uses lr)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    epochs: int = 2                # passes over each batch of rollouts
    minibatches: int = 2           # updates per pass
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05          # beta of the per-token reward -beta * (log pi_old - log pi_ref)
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    loss: fastpo.PolicyLossConfig = field(default_factory=fastpo.PolicyLossConfig)  # ppo, clip 0.2
    eval_every: int = 25
    seed: int = 0
    num_threads: int | None = 1


def value_head_for(model) -> torch.nn.Linear:
    """A zero-initialised ``nn.Linear(hidden_size, 1)`` on the policy's device and dtype."""
    weight = head(model)[0]
    value_head = torch.nn.Linear(weight.shape[1], 1).to(device=weight.device, dtype=weight.dtype)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    return value_head


def values_of(value_head, hidden) -> torch.Tensor:
    """V(s_t) ``[B, T - 1]`` at the positions of ``batch.labels`` (the state before token t + 1)."""
    return value_head(hidden).squeeze(-1).float()


def ppo_loss(model, value_head, batch, old_logprobs, old_values, advantages, returns, config: PPOConfig):
    """``(total loss, PolicyLossOutput, value loss)`` for one packed minibatch (under data
    parallel: normalised by the global minibatch's token and sequence counts)."""
    weight, bias = head(model)
    hidden = hidden_states(model, batch)
    mask = batch.labels != IGNORE_INDEX
    counts = dict(num_tokens=global_count(mask.sum()), num_sequences=global_count(mask.shape[0]))
    policy = fastpo.linear_policy_loss(hidden, weight, batch.labels, old_logprobs, advantages, bias=bias,
                                       config=config.loss, **counts)
    value = fastpo.value_loss(values_of(value_head, hidden), old_values, returns, mask, clip=config.value_clip,
                              **counts)
    return policy.loss + config.vf_coef * value, policy, value


def ppo_advantages(scores, kl, values, mask, config: PPOConfig):
    """``(whitened advantages, returns)`` ``[B, T]`` from the scores ``[B]``, the per-token KL
    estimate ``log pi_old - log pi_ref`` and the old values ``[B, T]``."""
    rewards = fastpo.token_rewards(scores, mask, kl=kl, kl_coef=config.kl_coef)
    advantages, returns = fastpo.gae(rewards, values, mask, gamma=config.gamma, lam=config.lam)
    return whiten(advantages, mask), returns  # over the global batch under data parallel


@torch.no_grad()
def logprobs_and_values(model, value_head, batch):
    weight, bias = head(model)
    hidden = hidden_states(model, batch)
    logp = fastpo.linear_token_logprobs(hidden, weight, batch.labels, bias=bias)
    return logp, None if value_head is None else values_of(value_head, hidden)


class PPOTrainer:
    """``PPOTrainer(model_or_dir, tokenizer, reward_fns, prompts, config).train()``; reward
    functions ``fn(prompts, completions) -> list[float]`` are summed into the score (a
    ``RewardModelScorer`` is one). ``monitor_fns`` ({name: fn}): logged, not optimised (e.g. the
    task reward while a reward model is optimised). Under torchrun each rank samples and trains
    on its shard of every step's prompts; ``data_shards`` N in one process samples like an
    N-rank run (see ``rollout.generate_shards``)."""

    checkpoint_modules = ("model", "value_head")

    def __init__(self, model, tokenizer=None, reward_fns=(), dataset=(), config: PPOConfig | None = None, *,
                 monitor_fns=None, evaluator=None, metrics_path: str | None = None, value_head=None,
                 data_shards: int | None = None):
        self.model, self.tokenizer = load_policy(model, tokenizer)
        self.reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not self.reward_fns:
            raise ValueError("PPOTrainer: pass at least one reward function fn(prompts, completions)")
        self.monitor_fns = dict(monitor_fns or {})
        self.dataset = check_dataset("PPOTrainer", dataset)
        self.config = cfg = config or PPOConfig()
        if cfg.rollouts_per_step < cfg.minibatches:
            raise ValueError("PPOTrainer: rollouts_per_step must be >= minibatches")
        self.data_shards = data_shards
        shards = len(local_shards(data_shards, cfg.rollouts_per_step, "PPOConfig.rollouts_per_step"))
        if cfg.rollouts_per_step // shards < cfg.minibatches:
            raise ValueError("PPOTrainer: each data shard needs at least `minibatches` rollouts")
        self.value_head = value_head if value_head is not None else value_head_for(self.model)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        self.evaluator, self.metrics = evaluator, MetricsWriter(metrics_path)
        self.optimizer = torch.optim.AdamW([
            {"params": list(self.model.parameters()), "lr": cfg.lr},
            {"params": list(self.value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
        self.scheduler = linear_warmup(self.optimizer, cfg.warmup_steps)
        self.step = 0

    def evaluate(self):
        return write_eval(self)

    def rollout(self, generator):
        cfg = self.config
        idx = torch.randint(len(self.dataset), (cfg.rollouts_per_step,), generator=generator).tolist()
        prompts, ro, shards = generate_shards(self.model, self.tokenizer, [self.dataset[i] for i in idx],
                                              self.data_shards, generator, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature)
        return prompts, ro, sum_rewards(self.reward_fns, prompts, ro.texts), shards

    def train_step(self, generator) -> dict:
        cfg = self.config
        prompts, ro, scores, shards = self.rollout(generator)
        monitors = {k: global_mean(call_reward(fn, prompts, ro.texts)) for k, fn in self.monitor_fns.items()}
        batch = pack(ro)
        mask = batch.labels != IGNORE_INDEX
        old, old_values = logprobs_and_values(self.model, self.value_head, batch)  # the one old-policy forward
        kl = torch.zeros_like(old)
        if self.reference is not None:
            kl = (old - logprobs_and_values(self.reference, None, batch)[0]) * mask
        old_values = old_values * mask
        advantages, returns = ppo_advantages(scores.to(old.device), kl, old_values, mask, cfg)
        params = list(self.model.parameters()) + list(self.value_head.parameters())
        losses, value_losses, metrics = [], [], []
        for _ in range(cfg.epochs):
            order = torch.randperm(batch.input_ids.shape[0] // shards, generator=generator)
            for ids in shard_chunks(batch.input_ids.shape[0], shards, cfg.minibatches, order):
                loss, out, value = ppo_loss(self.model, self.value_head, batch.rows(ids), old[ids], old_values[ids],
                                            advantages[ids], returns[ids], cfg)
                apply_gradients(self, loss, params)
                losses.append(all_sum(loss.detach()).item())
                value_losses.append(all_sum(value.detach()).item())
                metrics.append(weighted_mean(out.metrics, mask[ids].sum()))
        last = metrics[-1]
        tokens = all_sum(mask.sum()).item()
        return {"loss": sum(losses) / len(losses), "reward": global_mean(scores), **monitors,
                "kl": global_mean(kl.sum(-1)), "value_loss": sum(value_losses) / len(value_losses),
                "clip_frac_low": last["clip_frac_low"].item(), "clip_frac_high": last["clip_frac_high"].item(),
                "ratio_mean": last["ratio_mean"].item(), "value_mean": all_sum(old_values.sum()).item() / tokens,
                "completion_length": global_mean(mask.sum(-1).float())}

    def save_value_head(self, path: str) -> None:
        torch.save(self.value_head.state_dict(), path)

    def train(self, **options):
        """``options``: ``checkpoint_dir``, ``save_every``, ``resume``, ``progress`` (``run_loop``)."""
        return run_loop(self, **options)
