"""``linear_token_logprobs`` with a frozen head (LoRA: only hidden needs a gradient), timed
interleaved, forward + backward (dL/dhidden only):

  fastpo[cpu]            the frozen-head path: d logp / d hidden formed in the forward, 2 GEMMs
  fastpo[cpu] recompute  the same op through its recompute path (forced, as when the entropy
                         is returned): forward 1 GEMM, backward 2 (recomputed logits, dL/dhidden)
  torch-naive            ``hidden @ W.T -> log_softmax (fp32) -> gather``, autograd
  liger                  Liger's chunked selective log-prob (if installed)

Also each implementation's dL/dhidden error (max abs / max abs) against float64 naive.

    python bench/linear_frozen_head.py --json bench/results/cpu-2core/linear_frozen_head.json
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import torch

import fastpo
from fastpo.benchmarks.linear import _liger_logprob, _naive_logp
from fastpo.functional import linear as linear_fn
from linear_interleaved import interleaved_args  # bench/ is on the path when run as a script


def _recompute(hidden, weight, labels):
    """The op with ``entropy_grad=True``: the recompute path on the same inputs (same math)."""
    h2, rows, kept = linear_fn._rows(hidden, labels, labels != -100)
    opts = linear_fn._options("linear_token_logprobs", hidden, 1.0, 1.0, None, -100, None, "cpu")
    return linear_fn.LinearTokenLogprobsFunction.apply(h2, weight, None, kept, rows, opts, None, (), True)[0]


def main() -> int:
    a = interleaved_args(__doc__, default="2048,8192", help="comma-separated token counts")
    liger = _liger_logprob()
    rows = []
    for n in map(int, a.n.split(",")):
        for name in a.dtypes.split(","):
            dtype = getattr(torch, name)
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(n, a.h, generator=g).to(dtype).requires_grad_()
            weight = (torch.randn(a.v, a.h, generator=g) / a.h ** 0.5).to(dtype)  # frozen
            labels = torch.randint(0, a.v, (n,), generator=g)
            up = torch.randn(n, generator=g)
            impls = {
                "fastpo[cpu]": lambda: fastpo.linear_token_logprobs(hidden, weight, labels, backend="cpu"),
                "fastpo[cpu] recompute": lambda: _recompute(hidden, weight, labels),
                "torch-naive": lambda: _naive_logp(hidden, weight, labels),
            }
            if liger is not None:
                impls["liger"] = lambda: liger(hidden, weight, labels)

            def step(fn, leaf=hidden):
                (gh,) = torch.autograd.grad((fn().double() * up.double()).sum(), leaf)
                return gh

            h64 = hidden.detach().double().requires_grad_()  # the float64 oracle of dL/dhidden
            ref = step(lambda: _naive_logp(h64, weight.double(), labels), h64)
            errs = {k: ((step(f).double() - ref).abs().max() / ref.abs().max()).item() for k, f in impls.items()}
            del h64
            times = {k: [] for k in impls}
            for _ in range(a.rounds):
                for k, f in impls.items():
                    t0 = time.perf_counter()
                    step(f)
                    times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"n": n, "h": a.h, "v": a.v, "dtype": name, "rounds": a.rounds,
                   "median_ms": {k: round(v, 1) for k, v in med.items()},
                   "runs_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
                   "grad_rel_err_vs_float64": {k: float(f"{e:.3g}") for k, e in errs.items()},
                   "speedup_vs_recompute": round(med["fastpo[cpu] recompute"] / med["fastpo[cpu]"], 3)}
            rows.append(row)
            print(f"{n}x{a.h}x{a.v} {name:9s} " + "  ".join(f"{k} {v:8.1f} ms" for k, v in med.items())
                  + f"  | recompute / frozen-head path {row['speedup_vs_recompute']:.3f}", flush=True)
    if a.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
