"""Tail latency of the cpu backend on this machine (issue 8, defect 12).

Token log-probs forward + backward at N=2048, V=32000, a fresh leaf every run (so every
gradient buffer is a fresh allocation, as in training), in three back-to-back loops of
15 runs, for fastpo[cpu] (out of place and in place) and torch's log_softmax + gather.
Reports median / p90 / min per loop and the kernel's compaction stalls during it. Times
include the fresh copy of the logits each run makes (one for fastpo[cpu] and torch, two for
the in-place path: the leaf and the non-leaf buffer the gradient overwrites), so compare
p90/median and the tails here, and `fastpo bench` for speed.

    python bench/cpu_tail_latency.py --json bench/results/cpu-2core/tail_latency.json
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

import fastpo
from fastpo.benchmarks._measure import time_stats

N, V, LOOPS, RUNS = 2048, 32000, 3, 15


def _steps(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)

    def fastpo_step(inplace):
        def step():
            x = base.clone().requires_grad_() if not inplace else base.clone().requires_grad_().clone()
            lp = fastpo.token_logprobs(x, labels, backend="cpu", inplace_backward=inplace)
            lp.backward(up.to(lp.dtype))
        return step

    def torch_step():
        x = base.clone().requires_grad_()
        lp = torch.log_softmax(x.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
        lp.backward(up)

    return {"fastpo[cpu]": fastpo_step(False), "fastpo[cpu] inplace": fastpo_step(True), "torch-naive": torch_step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for impl, step in _steps(dtype).items():
            for loop in range(LOOPS):
                st = time_stats(step, torch.device("cpu"), warmup=1, reps=RUNS)
                rows.append({"impl": impl, "dtype": str(dtype).removeprefix("torch."), "loop": loop,
                             "median_ms": round(st.median_ms, 2), "p90_ms": round(st.p90_ms, 2),
                             "min_ms": round(st.min_ms, 2), "p90_over_median": round(st.p90_ms / st.median_ms, 3),
                             "runs": st.runs, "compact_stalls": st.compact_stalls})
                r = rows[-1]
                print(f"{impl:22s} {r['dtype']:9s} loop {loop}: median {r['median_ms']:8.2f}  p90 {r['p90_ms']:8.2f}"
                      f"  min {r['min_ms']:8.2f}  p90/median {r['p90_over_median']:.2f}  stalls {r['compact_stalls']}")
    if a.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
               "shape": f"{N}x{V}", "loops": LOOPS, "runs_per_loop": RUNS}
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                env["thp_enabled"] = f.read().strip()
            with open("/sys/kernel/mm/transparent_hugepage/defrag") as f:
                env["thp_defrag"] = f.read().strip()
        except OSError:
            pass
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
