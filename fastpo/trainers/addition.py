"""The default task: two-digit addition, its sloppy demonstrator, its reward and its evaluator.

a, b uniform in [10, 99]; prompt ``"47+85="``; the answer is always three digits, zero
padded (``"12+35=047"``), then EOS; reward 1 if exactly right, else 0. The demonstrator drops
the hundreds digit 70 % of the time (``"47+85=032"``), so imitation learns the easy problems
(sum < 100) and copies the flaw on the hard ones; reward optimisation has to fix it.
"""
from __future__ import annotations

import random

import torch

DROP_HUNDREDS = 0.7


def sample_problems(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_of(a: int, b: int) -> str:
    return f"{a + b:03d}"


def prompts(n: int, seed: int) -> list[str]:
    return [prompt_of(a, b) for a, b in sample_problems(n, seed)]


def demonstrations(n: int, seed: int, drop: float = DROP_HUNDREDS) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from the sloppy demonstrator (completion without EOS)."""
    rng = random.Random(seed + 1)
    out = []
    for a, b in sample_problems(n, seed):
        answer = answer_of(a, b)
        if a + b >= 100 and rng.random() < drop:
            answer = "0" + answer[1:]
        out.append((prompt_of(a, b), answer))
    return out


def _parse(prompt: str) -> tuple[int, int] | None:
    try:
        a, b = prompt.rstrip("=").split("+")
        return int(a), int(b)
    except ValueError:
        return None


def addition_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion is exactly the three-digit sum (EOS already stripped), else 0.0."""
    out = []
    for p, c in zip(prompts, completions):
        ab = _parse(p)
        out.append(float(ab is not None and c == answer_of(*ab)))
    return out


def is_hard(prompt: str) -> bool:
    ab = _parse(prompt)
    return ab is not None and sum(ab) >= 100


@torch.no_grad()
def evaluate(model, tokenizer, *, n: int = 400, seed: int = 12345, batch_size: int = 400,
             max_new_tokens: int = 4) -> dict:
    """Greedy accuracy on ``n`` fresh problems: overall, easy (sum < 100) and hard (sum >= 100)."""
    from .rollout import generate

    ps = prompts(n, seed)
    completions = []
    for i in range(0, n, batch_size):
        completions += generate(model, tokenizer, ps[i:i + batch_size], max_new_tokens=max_new_tokens,
                                do_sample=False).texts
    rewards = addition_reward(ps, completions)
    hard = [is_hard(p) for p in ps]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"accuracy": mean(rewards),
            "easy_accuracy": mean([r for r, h in zip(rewards, hard) if not h]),
            "hard_accuracy": mean([r for r, h in zip(rewards, hard) if h])}


def preference_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, correct answer, wrong answer) for reward-model training. The wrong answer is,
    in equal shares: the sloppy demonstrator's (hundreds digit dropped; a random other answer on
    easy problems), a uniformly random other answer in 000-198, or the correct one with one digit
    changed. (One-digit changes of the ones digit are the hard part for the reward model.)"""
    rng = random.Random(seed + 2)
    out = []
    for a, b in sample_problems(n, seed):
        right, kind = answer_of(a, b), rng.randrange(3)
        if kind == 0 and a + b >= 100:
            wrong = "0" + right[1:]
        elif kind < 2:
            wrong = f"{rng.choice([x for x in range(199) if x != a + b]):03d}"
        else:
            i = rng.randrange(3)
            wrong = right[:i] + rng.choice([d for d in "0123456789" if d != right[i]]) + right[i + 1:]
        out.append((prompt_of(a, b), right, wrong))
    return out
