"""Cost of the policy-parity features on the fused path (issue 9 target: <= 1.1x).

The `fastpo bench` cases "fastpo[cpu]" (GRPO-style ppo + k3 KL) and "fastpo[cpu] is+klxr" (the
same with rollout IS weights and TRL 1.16's KL x ratio), timed interleaved — one run of each in
turn, 3 loops x 15 pairs — so that the machine's drift between runs hits both alike. Reports
each loop's medians and the ratio of medians.

    python bench/policy_parity_overhead.py --json bench/results/cpu-2core/policy_parity_overhead.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fastpo.benchmarks import policy_loss

LOOPS, PAIRS = 3, 15
IMPLS = ("fastpo[cpu]", "fastpo[cpu] is+klxr")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for case_dtype in (torch.float32, torch.bfloat16):
        cases = {c.impl: c for c in policy_loss.cases(torch.device("cpu"), [(8, 256, 32000, case_dtype)])
                 if c.impl in IMPLS}
        for c in cases.values():
            c.step()  # warm-up
        for loop in range(LOOPS):
            times = {k: [] for k in IMPLS}
            for _ in range(PAIRS):
                for k in IMPLS:
                    t0 = time.perf_counter()
                    cases[k].step()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"dtype": str(case_dtype).removeprefix("torch."), "loop": loop, "pairs": PAIRS,
                   "plain_median_ms": round(med[IMPLS[0]], 2), "is_klxr_median_ms": round(med[IMPLS[1]], 2),
                   "ratio": round(med[IMPLS[1]] / med[IMPLS[0]], 3)}
            rows.append(row)
            print(f"{row['dtype']:9s} loop {loop}: plain {row['plain_median_ms']:7.2f} ms  "
                  f"is+klxr {row['is_klxr_median_ms']:7.2f} ms  ratio {row['ratio']:.3f}")
    if a.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
               "shape": "8x256x32000", "config": "ppo clip 0.2/0.28 + k3 KL 0.04; is+klxr: + policy_weights 0.9, "
                                                 "kl_importance_weighted"}
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
