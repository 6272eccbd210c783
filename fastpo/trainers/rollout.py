"""Sequences as the trainers see them: prompts left-padded, completions right-padded after EOS.

``Batch.labels[b, t]`` is the token that ``hidden[b, t]`` predicts (``input_ids[b, t + 1]``)
on completion positions (EOS included) and ``-100`` elsewhere, so every loss is taken on
completion tokens only, from the trunk's hidden states and the output head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import local_shards, shard_rows, world

IGNORE_INDEX = -100


@dataclass
class Rollout:
    prompt_ids: torch.Tensor        # [B, P] int64, left-padded
    prompt_mask: torch.Tensor       # [B, P] int64
    completion_ids: torch.Tensor    # [B, C] int64, pad after the first EOS
    completion_mask: torch.Tensor   # [B, C] int64, 1 up to and including the first EOS
    texts: list                     # B completion strings, EOS and padding removed


@dataclass
class Batch:
    input_ids: torch.Tensor         # [B, P + C]
    attention_mask: torch.Tensor    # [B, P + C]
    position_ids: torch.Tensor      # [B, P + C], counted from the first real token
    labels: torch.Tensor            # [B, P + C - 1], IGNORE_INDEX outside the completion

    def rows(self, index) -> "Batch":
        return Batch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                     self.labels[index])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for i, x in enumerate(ids):
        out[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return out.to(device), mask.to(device)


def _completion_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row (all ones for a row without EOS)."""
    is_eos = (ids == eos_id).int()
    before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before t
    return (before == 0).to(torch.int64)


def _texts(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    keep = mask.bool() & (ids != tokenizer.eos_token_id)
    return [tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(ids, keep)]


def encode_completions(tokenizer, prompts: list[str], completions: list[str], device) -> Rollout:
    """Given (prompt, completion) strings: the completion's tokens plus EOS."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return Rollout(prompt_ids, prompt_mask, out.to(device), mask.to(device), list(completions))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 1.0, num_return_sequences: int = 1) -> Rollout:
    """Sample (or greedy-decode) completions with ``model.generate``; each prompt repeated
    ``num_return_sequences`` times consecutively (the group layout of ``group_advantages``)."""
    prompts = [p for p in prompts for _ in range(num_return_sequences)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, _device(model))
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1]:]
    mask = _completion_mask(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, _texts(tokenizer, completion_ids, mask))


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts one after the other: prompts left-padded, completions right-padded to one width."""
    if len(parts) == 1:
        return parts[0]

    def cat(tensors, left):
        width = max(t.shape[1] for t in tensors)
        pads = [(width - t.shape[1], 0) if left else (0, width - t.shape[1]) for t in tensors]
        return lambda fill: torch.cat([torch.nn.functional.pad(t, p, value=fill) for t, p in zip(tensors, pads)])

    prompts = cat([r.prompt_ids for r in parts], True)(pad_id)
    prompt_mask = cat([r.prompt_mask for r in parts], True)(0)
    completions = cat([r.completion_ids for r in parts], False)(pad_id)
    completion_mask = cat([r.completion_mask for r in parts], False)(0)
    return Rollout(prompts, prompt_mask, completions, completion_mask, [t for r in parts for t in r.texts])


def generate_shards(model, tokenizer, prompts: list[str], data_shards: int | None, generator: torch.Generator,
                    **options) -> tuple[list[str], Rollout, int]:
    """This rank's part of a step's sampling: ``prompts`` (the same global list on every rank)
    split into ``data_shards`` (default: the world size) equal contiguous shards, each sampled by
    its own ``generate`` call after seeding torch with a per-shard seed drawn from ``generator``.
    So the samples of a shard do not depend on which rank, or how many, produce them: one
    process with ``data_shards=N`` reproduces an N-rank run. A single shard: one plain call
    (torch's global RNG as it stands). Returns ``(local prompts, rollout, local shards)``; the
    rollout rows are each local prompt repeated ``num_return_sequences`` times."""
    local = local_shards(data_shards, len(prompts), "prompts per step")
    shards = data_shards or world()[1]
    if shards == 1:
        return prompts, generate(model, tokenizer, prompts, **options), 1
    seeds = torch.randint(2 ** 62, (shards,), generator=generator).tolist()  # drawn on every rank alike
    parts, mine = [], []
    for s in local:
        torch.manual_seed(seeds[s])
        mine += shard_rows(prompts, shards, s)
        parts.append(generate(model, tokenizer, shard_rows(prompts, shards, s), **options))
    return mine, concat_rollouts(parts, tokenizer.pad_token_id), len(local)


def shard_chunks(rows: int, shards: int, chunks: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of ``chunks`` minibatches over ``rows`` rows made of ``shards`` equal shards:
    minibatch i = chunk i of every shard (rows within a shard permuted by ``order``, a
    permutation of the shard's rows) — the union over ranks of what each rank's minibatch i
    holds. One shard: ``order.chunk(chunks)`` (``arange`` without an order)."""
    per = rows // shards
    order = torch.arange(per) if order is None else order
    return [torch.cat([s * per + c for s in range(shards)]) for c in order.chunk(chunks)]


def pack(rollout: Rollout) -> Batch:
    """Prompt and completion side by side, with labels on the completion tokens only."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    keep = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.completion_mask], 1)[:, 1:]
    labels = input_ids[:, 1:].masked_fill(keep == 0, IGNORE_INDEX)
    return Batch(input_ids, attention_mask, position_ids, labels)


def head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's (weight ``[V, H]``, bias ``[V]`` or None)."""
    lm_head = model.get_output_embeddings()
    return lm_head.weight, getattr(lm_head, "bias", None)


def hidden_states(model, batch: Batch) -> torch.Tensor:
    """The trunk's last hidden states ``[B, T - 1, H]``, aligned with ``batch.labels``: the
    logits are never formed (the head is applied by fastpo's linear ops)."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state[:, :-1]
