"""DPO (Rafailov et al. 2023) on offline (prompt, chosen, rejected) pairs, with the optional
NLL term on the chosen answer of RPO (Pang et al. 2024; TRL's ``rpo_alpha``).

The reference log-probs log pi_ref(y | x) of every pair are computed once, before training
(the starting model is the reference). Per step, on B pairs:
    loss = fastpo.linear_dpo_loss(...)                              (eq. 7 for "sigmoid")
         + rpo_alpha * (-(1/N_chosen) sum_{chosen tokens} log pi(y_t | ...))
both from the same trunk forward over the 2B rows (B chosen, then B rejected).
On the default task pure sigmoid DPO is unstable (chosen and rejected answers share most of
their digits, so pushing the rejected one down also pushes the chosen one down); the NLL term
keeps the chosen answer likely.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import fastpo

from .common import (MetricsWriter, apply_gradients, check_dataset, linear_warmup, load_policy, run_loop,
                     sum_rewards, write_eval)
from .distributed import all_sum, global_count, local_shards, shard_rows, weighted_mean, world
from .rollout import encode_completions, generate, head, hidden_states, pack


@dataclass
class DPOConfig:
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    beta: float = 0.1
    loss_type: str = "sigmoid"     # any loss_type of fastpo.dpo_loss
    label_smoothing: float = 0.0
    rpo_alpha: float | None = 1.0  # weight of the chosen NLL; None: pure DPO
    eval_every: int = 25
    seed: int = 0
    num_threads: int | None = 1


@torch.no_grad()
def sample_preference_pairs(model, tokenizer, prompts, reward_fns, *, samples_per_prompt: int = 8,
                            max_new_tokens: int = 4, temperature: float = 1.0,
                            batch_prompts: int = 64) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) from the model's own samples: per prompt the best- and the
    worst-rewarded distinct completions, where their rewards differ."""
    fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
    pairs = []
    for i in range(0, len(prompts), batch_prompts):
        chunk = prompts[i:i + batch_prompts]
        ro = generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                      num_return_sequences=samples_per_prompt)
        repeated = [p for p in chunk for _ in range(samples_per_prompt)]
        rewards = sum_rewards(fns, repeated, ro.texts).view(len(chunk), samples_per_prompt)
        for j, p in enumerate(chunk):
            best, worst = rewards[j].argmax().item(), rewards[j].argmin().item()
            if rewards[j, best] > rewards[j, worst]:
                texts = ro.texts[j * samples_per_prompt:(j + 1) * samples_per_prompt]
                pairs.append((p, texts[best], texts[worst]))
    return pairs


def pair_batch(tokenizer, pairs, device):
    """The packed ``[2B]`` batch: B chosen rows, then B rejected (one common width)."""
    prompts = [p for p, _, _ in pairs]
    return pack(encode_completions(tokenizer, prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs],
                                   device))


def dpo_step_loss(model, batch, ref_chosen, ref_rejected, config: DPOConfig):
    """``(total loss, DPO loss, DPOOutput, nll)`` for one packed pair batch; under data parallel
    both means are over the global batch (pairs, chosen tokens), this rank's share of them."""
    weight, bias = head(model)
    hidden = hidden_states(model, batch)
    out = fastpo.linear_dpo_loss(hidden, weight, batch.labels, ref_chosen, ref_rejected, bias=bias,
                                 beta=config.beta, loss_type=config.loss_type,
                                 label_smoothing=config.label_smoothing)
    b = hidden.shape[0] // 2
    pairs = global_count(b)
    dpo = out.loss if pairs is None else out.loss * (b / pairs)  # the mean over the global pairs
    loss, nll = dpo, None
    if config.rpo_alpha:
        chosen_labels = batch.labels[:b]
        logp = fastpo.linear_sequence_logprobs(hidden[:b], weight, chosen_labels, bias=bias)
        n = (chosen_labels != -100).sum()
        total = global_count(n)
        nll = -logp.sum() / (n if total is None else total).clamp_min(1)
        loss = loss + config.rpo_alpha * nll
    return loss, dpo, out, nll


class DPOTrainer:
    """``DPOTrainer(model_or_dir, tokenizer, pairs, config).train()``; pairs: (prompt, chosen,
    rejected) strings (see ``sample_preference_pairs``). Under torchrun each rank takes its
    share of every batch."""

    checkpoint_modules = ("model",)

    def __init__(self, model, tokenizer=None, dataset=(), config: DPOConfig | None = None, *,
                 evaluator=None, metrics_path: str | None = None):
        self.model, self.tokenizer = load_policy(model, tokenizer)
        self.dataset = check_dataset("DPOTrainer", dataset)
        self.config = cfg = config or DPOConfig()
        self.evaluator, self.metrics = evaluator, MetricsWriter(metrics_path)
        self.ref_chosen, self.ref_rejected = self.reference_logprobs()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scheduler = linear_warmup(self.optimizer, cfg.warmup_steps)
        local_shards(None, self.pairs_per_step, "DPO pairs per step")  # splits over the ranks
        self.step = 0

    @property
    def pairs_per_step(self) -> int:
        return min(self.config.batch_size, len(self.dataset))

    @torch.no_grad()
    def reference_logprobs(self, chunk: int = 256):
        """log pi_ref of every chosen and rejected completion, once (pi_ref = the starting model)."""
        device = next(self.model.parameters()).device
        weight, bias = head(self.model)
        chosen, rejected = [], []
        for i in range(0, len(self.dataset), chunk):
            pairs = self.dataset[i:i + chunk]
            batch = pair_batch(self.tokenizer, pairs, device)
            logp = fastpo.linear_sequence_logprobs(hidden_states(self.model, batch), weight, batch.labels, bias=bias)
            chosen.append(logp[:len(pairs)])
            rejected.append(logp[len(pairs):])
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self):
        return write_eval(self)

    def train_step(self, generator) -> dict:
        cfg, device = self.config, next(self.model.parameters()).device
        idx = torch.randint(len(self.dataset), (self.pairs_per_step,), generator=generator)
        idx = shard_rows(idx, world()[1], local_shards(None, len(idx), "DPO pairs per step")[0])
        batch = pair_batch(self.tokenizer, [self.dataset[i] for i in idx.tolist()], device)
        loss, dpo, out, nll = dpo_step_loss(self.model, batch, self.ref_chosen[idx].to(device),
                                            self.ref_rejected[idx].to(device), cfg)
        apply_gradients(self, loss, list(self.model.parameters()))
        means = weighted_mean({"reward_accuracy": out.accuracy, "margin": out.margins.mean(),
                               "chosen_reward": out.chosen_rewards.mean(),
                               "rejected_reward": out.rejected_rewards.mean()}, torch.tensor(len(idx)))
        return {"loss": all_sum(loss.detach()).item(), "dpo_loss": all_sum(dpo.detach()).item(),
                "nll": None if nll is None else all_sum(nll.detach()).item(),
                **{k: v.item() for k, v in means.items()}}

    def train(self, **options):
        """``options``: ``checkpoint_dir``, ``save_every``, ``resume``, ``progress`` (``run_loop``)."""
        return run_loop(self, **options)
