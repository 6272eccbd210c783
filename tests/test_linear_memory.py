"""The linear ops' memory: the default chunk size (from V, the dtype and the free memory) and
the head-sized buffers (one fp32 V x H accumulator that is the returned dW for fp32 weights; no
V x H temporary per chunk for 16-bit weights). Not timed."""
from __future__ import annotations

import pytest
import torch

import fastpo
from fastpo.benchmarks._measure import peak_extra_bytes
from fastpo.ops import linear_head as lh
from fastpo.ops.linear_head import HeadOptions, LinearHead

MIB = 1 << 20


# ----------------------------------------------------------------------------- default chunk
@pytest.mark.parametrize("vocab", [32000, 50257, 151936])  # Llama 2, GPT-2 (odd), Qwen 2
@pytest.mark.parametrize("budget", [16 * MIB, 64 * MIB, 1 * MIB])  # 1 MiB: below one aligned block
def test_default_chunk_follows_vocab_and_budget(vocab, budget):
    row = vocab * 4
    step = lh.default_chunk_size(1 << 20, row, budget)
    fits = budget // row
    if fits >= lh.CHUNK_ALIGN:
        # the most aligned rows that fit: within budget, one more block would not be
        assert step % lh.CHUNK_ALIGN == 0 and step * row <= budget < (step + lh.CHUNK_ALIGN) * row
    else:
        assert step == lh.CHUNK_ALIGN  # the floor: never a GEMM of a handful of rows
    # twice the vocabulary (or half the budget): about half the rows
    half = lh.default_chunk_size(1 << 20, 2 * row, budget)
    assert half == lh.default_chunk_size(1 << 20, row, budget // 2)
    assert half <= step and (half == lh.CHUNK_ALIGN or abs(2 * half - step) <= lh.CHUNK_ALIGN)
    # never more rows than are kept
    assert lh.default_chunk_size(37, row, budget) == min(37, step)


def test_chunk_budget_is_capped_fraction_of_free_memory(monkeypatch):
    for free in (None, 1 << 40, 64 * MIB):
        monkeypatch.setattr(lh, "free_memory_bytes", lambda device, f=free: f)
        want = lh.CHUNK_BYTES_CAP if free is None else min(lh.CHUNK_BYTES_CAP, int(free * lh.CHUNK_FREE_FRACTION))
        assert lh.chunk_budget_bytes("cpu") == want
    assert want < lh.CHUNK_BYTES_CAP  # the last one: memory pressure shrinks the chunk


def test_free_memory_reads_the_machine():
    free = lh.free_memory_bytes("cpu")
    assert free is None or free > 0


@pytest.mark.parametrize("dtype,softcap", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 30.0)])
def test_head_uses_the_default_rule(monkeypatch, dtype, softcap):
    """LinearHead's chunk = the rule applied to V, the logits' bytes (softcap: its extra buffers)
    and the budget; an explicit chunk_size wins."""
    vocab, budget = 1000, 3 * lh.CHUNK_ALIGN * 1000 * 4 + 1
    monkeypatch.setattr(lh, "chunk_budget_bytes", lambda device: budget)
    hidden, weight = torch.zeros(4096, 8, dtype=dtype), torch.zeros(vocab, 8, dtype=dtype)
    rows = torch.arange(4096)
    opts = HeadOptions(1.0, 1.0, softcap, -100, None, "torch")
    head = LinearHead(hidden, weight, None, rows, rows % vocab, opts)
    per = dtype.itemsize + ((4 + dtype.itemsize) if softcap else 0)
    assert head.step == lh.default_chunk_size(4096, vocab * per, budget)
    assert head.step == {4: 3, 2: 6, 8: 1}[per] * lh.CHUNK_ALIGN
    explicit = LinearHead(hidden, weight, None, rows, rows % vocab, HeadOptions(1.0, 1.0, softcap, -100, 5, "torch"))
    assert explicit.step == 5


# ----------------------------------------------------------------------------- head-sized buffers
@pytest.mark.skipif("cpu" not in fastpo.ops.registry.backends_for("token_logprobs", "cpu"),
                    reason="needs the C++ cpu backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["token", "policy"])
def test_one_head_sized_accumulator(dtype, op):
    """n = 256 kept rows in 4 chunks, H = 2048, V = 4096 (V x H dominates every other buffer):
    fp32 peak <= dW (the accumulator itself is returned) + dhidden + a few chunks; bf16 <= the
    fp32 accumulator + max(its bf16 cast, one dW block) + dhidden + a few chunks. A second V x H
    buffer (a separate result, an unblocked 16-bit partial or its fp32 upcast) breaks the bound."""
    n, hidden_size, vocab, chunk = 256, 2048, 4096, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)

    def step():
        if op == "token":
            loss = fastpo.linear_token_logprobs(hidden, weight, labels, chunk_size=chunk, backend="cpu").sum()
        else:
            h, lab = hidden.view(4, 64, hidden_size), labels.view(4, 64)
            # an upstream of 3: the stored gradient is rescaled in place (GradBuffer), no copy
            loss = 3.0 * fastpo.linear_policy_loss(h, weight, lab, torch.full((4, 64), -8.0), torch.ones(4),
                                                   chunk_size=chunk, backend="cpu").loss
        return torch.autograd.grad(loss, (hidden, weight))

    head = vocab * hidden_size
    fp32_dw = 4 * head
    extra = 0 if dtype == torch.float32 else max(dtype.itemsize * head, lh.DW_BLOCK_BYTES)
    others = n * hidden_size * dtype.itemsize + 4 * chunk * vocab * 4  # dhidden, a few fp32 chunks
    peak = peak_extra_bytes(step, torch.device("cpu"))
    assert fp32_dw <= peak <= fp32_dw + extra + others, (peak / MIB, (fp32_dw + extra + others) / MIB)
