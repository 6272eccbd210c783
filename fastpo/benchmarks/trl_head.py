"""Benchmark cases for TRL 1.16's fused LM head, served by TRL and by fastpo (opt-in:
``fastpo bench --ops trl_head``; the default ``fastpo bench`` leaves it out, it takes minutes).

Every case is one forward + backward of the head every TRL trainer calls
(``_ChunkedLogProbFunction.apply(hidden [N, H], weight [V, H], None, targets [N], 1.0, 32768,
None, 1.0, outputs)``), with random upstream gradients on each returned output, returning the
gradients of hidden and weight:

  trl                    ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (TRL's own, also
                         while ``fastpo.integrations.trl`` is enabled); off CUDA its torch tiles
  fastpo                 ``fastpo.integrations.trl.FastpoChunkedLogProb`` (what the switch serves):
                         ``fastpo.linear_token_logprobs`` on the default backend
  torch-4gemm            for reference only: the 4 GEMMs both designs need when the upstream
                         gradient is unknown in the forward (logits; backward: recomputed logits,
                         dL/dhidden, dL/dweight) in chunks of 512 rows, no softmax: the floor

``outputs``: ``log_probs`` (SFT, DPO, RLOO: one upstream) and ``log_probs+entropy`` (GRPO's
``("log_probs", "entropy")``, entropy differentiable). Byte model (floor) as in ``linear``:
``2 * (N + V) * H * itemsize``; ``note`` carries the 8 N H V FLOPs of the 4 GEMMs.

``shapes``: a list of ``(N, H, V, dtype)``, or the CLI's ``(N, V, dtype)`` (H = 1024 on CPU,
4096 on CUDA). Default: N in (2048, 8192) x V in (32000, 128256), H = 1024 (CPU fp32, CUDA bf16).
Shapes above 2048 x 32000 run GRPO's outputs only, with 3 timed repetitions (not 10), and
above 5x that work 1: each TRL call there takes tens of seconds to minutes on 2 cores. A
shape whose estimated peak does not fit in the available memory is skipped, with a line
saying so.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator

import torch

from . import Case
from .linear import _as_nhv, floor_bytes

OUTPUTS = {"log_probs": ("log_probs",), "log_probs+entropy": ("log_probs", "entropy")}
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
TRL_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
SMALL_WORK = 2048 * 32000  # N x V up to which every case runs 10 repetitions
FLOOR_ROWS = 512  # row chunk of the 4-GEMM floor (fastpo's order of magnitude: 64-128 MiB of fp32 logits)


def default_shapes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h = 4096 if device.type == "cuda" else 1024
    return [(n, h, v, dtype) for n in (2048, 8192) for v in (32000, 128256)]


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _estimated_peak_bytes(n: int, h: int, v: int, itemsize: int) -> int:
    """Inputs, their gradients and TRL's fp32 accumulators, plus about ten fp32 copies of one
    TRL tile (its torch tile code holds z, e, p, log p, grad, ... of ``[4096, 32768]``)."""
    tile = min(n, TRL_TOKEN_CHUNK) * min(v, TRL_VOCAB_CHUNK) * 4
    return 2 * (n + v) * h * itemsize + (n + v) * h * 4 + 10 * tile


def _trl_function():
    if importlib.util.find_spec("trl") is None:
        return None
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception:  # absent in this trl version, or trl broken here
        return None
    return ChunkedLogProbFunction


def _four_gemms(hidden, weight):
    """The GEMMs of a head whose upstream is unknown in the forward, in row chunks."""
    h, w = hidden.detach(), weight.detach()
    rows = FLOOR_ROWS

    def step():
        dh, dw = torch.empty_like(h), torch.zeros_like(w)
        for start in range(0, h.shape[0], rows):
            hc = h[start:start + rows]
            hc @ w.T  # forward
            z = hc @ w.T  # backward: recomputed, then (here) used as dL/dz
            dh[start:start + rows] = z @ w
            dw.addmm_(z.T, hc)
        return dh, dw

    return step


def _shape_cases(n, h, v, dtype, device, trl_fn) -> Iterator[Case]:
    from ..integrations.trl_head import FastpoChunkedLogProb

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    up = torch.randn(2, n, generator=gen).to(device)
    work = n * v / SMALL_WORK
    reps = 10 if work <= 1 else 3 if work <= 5 else 1
    common = dict(op="trl_head", dtype=str(dtype).replace("torch.", ""), shape=f"{n}x{h}x{v}",
                  floor_bytes=floor_bytes(n, h, v, hidden.element_size()), reps=reps)
    note = f"8NHV={8 * n * h * v / 1e9:.0f} GFLOP" + ("" if reps == 10 else f", {reps} run(s)")
    impls = [("fastpo", FastpoChunkedLogProb)] + ([("trl", trl_fn)] if trl_fn is not None else [])
    variants = OUTPUTS if work <= 1 else {"log_probs+entropy": OUTPUTS["log_probs+entropy"]}
    for label, outputs in variants.items():
        for name, fn in impls:
            def step(fn=fn, outputs=outputs):
                got = fn.apply(hidden, weight, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0, outputs)
                loss = sum((x * u).sum() for x, u in zip(got[:2], up) if x is not None)
                return torch.autograd.grad(loss, [hidden, weight])

            yield Case(impl=f"{name}[{label}]", step=step, note=note, **common)
    yield Case(impl="torch-4gemm", step=_four_gemms(hidden, weight),
               note=note + ", reference: the 4 GEMMs alone, no softmax", **common)


def cases(device: torch.device, shapes=None) -> Iterator[Case]:
    trl_fn = _trl_function()
    available = _available_bytes(device)
    for shape in shapes or default_shapes(device):
        n, h, v, dtype = _as_nhv(shape, device)
        need = _estimated_peak_bytes(n, h, v, torch.empty((), dtype=dtype).element_size())
        if available is not None and need > 0.8 * available:
            print(f"trl_head: skipped {n}x{h}x{v} {dtype}: needs about {need / 2**30:.1f} GiB, "
                  f"{available / 2**30:.1f} GiB available", flush=True)
            continue
        yield from _shape_cases(n, h, v, dtype, device, trl_fn)
