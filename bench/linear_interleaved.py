"""fastpo's fused linear ops against the fastest chunked peer, timed interleaved.

`fastpo bench` times each implementation in its own block of runs, so a drift of the shared
machine between blocks lands on one side only (on this 2-core box the same fastpo case measured
6.1 s and 7.5 s in two runs minutes apart). Here the `fastpo.benchmarks.linear` cases run in
turn — one run of each implementation, `--rounds` times — so the drift hits every side alike.
Reports each case's median and the ratio of the peer's median to fastpo's (> 1: fastpo faster).

    python bench/linear_interleaved.py --n 8192 --json bench/results/cpu-2core/linear_interleaved_n8192.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fastpo.benchmarks import linear

PAIRS = {"linear_token_logprobs": ("fastpo[cpu]", "liger-chunked-selective-logprob"),
         "linear_policy_loss": ("fastpo[cpu]", "liger-fused-linear-grpo")}


def interleaved_args(doc: str, **n_option) -> argparse.Namespace:
    """The options of the interleaved linear benches (shape, dtypes, rounds, JSON path);
    ``n_option``: the ``--n`` argument's keywords (a single N here)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--n", **(n_option or dict(type=int, default=8192)))
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def main() -> int:
    a = interleaved_args(__doc__)
    rows = []
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        cases = {(c.op, c.impl): c for c in linear.cases(torch.device("cpu"), [(a.n, a.h, a.v, dtype)])
                 if c.impl in PAIRS.get(c.op, ())}
        for op, impls in PAIRS.items():
            todo = [cases[(op, i)] for i in impls if (op, i) in cases]
            if len(todo) < 2:
                print(f"{op} {name}: skipped (a peer is not installed)")
                continue
            for c in todo:
                c.step()  # warm-up
            times = {c.impl: [] for c in todo}
            for _ in range(a.rounds):
                for c in todo:
                    t0 = time.perf_counter()
                    c.step()
                    times[c.impl].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            ours, peer = impls
            row = {"op": op, "dtype": name, "shape": todo[0].shape, "rounds": a.rounds,
                   "median_ms": {k: round(v, 1) for k, v in med.items()},
                   "runs_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
                   "peer": peer, "peer_over_fastpo": round(med[peer] / med[ours], 3)}
            rows.append(row)
            print(f"{op:22s} {name:9s} {row['shape']}: fastpo {med[ours]:8.1f} ms  {peer} {med[peer]:8.1f} ms"
                  f"  ratio {row['peer_over_fastpo']:.3f}", flush=True)
    if a.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
               "machine": platform.machine()}
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
