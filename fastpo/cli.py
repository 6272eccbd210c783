"""Command line: `fastpo verify`, `fastpo bench`, `fastpo aot` and `fastpo train` (DESIGN.md §5)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "threads": torch.get_num_threads(), "machine": platform.machine()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _rich():
    """rich's Console/Table/escape; a plain-text stand-in where rich is absent (bare GPU images)."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        return Console, Table, escape
    except ImportError:
        pass

    class PlainTable:
        def __init__(self, title=""):
            self.title, self.rows = title, []

        def add_column(self, name):
            self.__dict__.setdefault("columns", []).append(name)

        def add_row(self, *cells):
            self.rows.append(cells)

    class PlainConsole:
        def __init__(self, width=None):
            pass

        def print(self, obj, highlight=False):
            if isinstance(obj, PlainTable):
                print(obj.title)
                print("\t".join(obj.columns))
                for row in obj.rows:
                    print("\t".join(str(c).replace("[green]", "").replace("[bold red]", "").replace("[/]", "") for c in row))
            else:
                print(obj)

    return PlainConsole, PlainTable, (lambda text: text)


def cmd_verify(args) -> int:
    Console, Table, _ = _rich()

    from .verify import as_records, run_checks

    checks = run_checks(args.device, args.ops)
    table = Table(title=f"fastpo verify ({args.device}): max relative error vs float64 reference")
    for col in ("op", "backend", "dtype", "shape", "quantity", "max rel err", "tol", "result"):
        table.add_column(col)
    for c in checks:
        verdict = "[green]PASS[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.op, c.backend, c.dtype, c.shape, c.quantity, f"{c.error:.2e}", f"{c.tol:.1e}", verdict)
    console = Console(width=140)
    console.print(table)
    failed = [c for c in checks if not c.passed]
    console.print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": _environment(args.device), "checks": as_records(checks)}, f, indent=1)
    return 1 if failed or not checks else 0


def _parse_shapes(text: str | None):
    if not text:
        return None
    shapes = []
    for item in text.split(","):
        n, v, dtype = item.split("x")
        shapes.append((int(n), int(v), getattr(torch, dtype)))
    return shapes


def cmd_bench(args) -> int:
    Console, Table, escape = _rich()

    from .benchmarks import collect_cases, device_peak_gbps, run_case

    device = torch.device(args.device)
    peak = device_peak_gbps(device)
    console = Console(width=160)
    console.print(f"measured {device.type} copy bandwidth: {peak:.1f} GB/s")
    results = []
    for case in collect_cases(device, args.ops, _parse_shapes(args.shapes)):
        results.append(run_case(case, device, peak))
        r = results[-1]
        console.print(escape(f"  {r.op} {r.impl} {r.dtype} {r.shape}: {r.median_ms:.2f} ms (p90 {r.p90_ms:.2f})"), highlight=False)
    table = Table(title=f"fastpo bench ({device.type}): forward + backward, median and p90 of >= 10 runs")
    for col in ("op", "impl", "dtype", "shape", "ms", "p90 ms", "floor GB/s", "% peak", "peak extra MiB", "note"):
        table.add_column(col)
    for r in results:
        pct = "" if r.pct_of_peak is None else f"{r.pct_of_peak:.0f}%"
        mem = "n/a" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.1f}"
        table.add_row(r.op, escape(r.impl), r.dtype, r.shape, f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.floor_gbps:.1f}", pct, mem, r.note)
    console.print(table)
    payload = {"environment": _environment(args.device), "device_copy_gbps": peak,
               "results": [asdict(r) for r in results]}
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
    console.print(f"wrote {args.json}")
    if args.png:
        _plot(results, args.png, console)
    return 0


def _plot(results, path: str, console) -> None:
    from .benchmarks.plot import plot_results

    if plot_results(results, path):
        console.print(f"wrote {path}")
    else:
        console.print("matplotlib not installed (pip install 'fastpo[plot]'): no PNG written")


def cmd_aot(args) -> int:
    from .aot import run, summary
    from .aot.cuda_report import _table as cuda_table
    from .aot.triton_report import table as triton_table

    archs = [int(a) for a in args.arch.split(",") if a]
    rows, bad = run(archs, args.json, triton=not args.cuda_only, cuda=not args.triton_only, python=args.python)
    triton_rows = [r for r in rows if r["backend"] == "triton"]
    cuda_rows = [r for r in rows if r["backend"] == "cuda"]
    if triton_rows:
        print(triton_table(triton_rows))
    if cuda_rows:
        print(cuda_table(cuda_rows))
    for r in rows:
        if r["violations"]:
            print(f"VIOLATION {r['backend']} {r['kernel']} {r['variant']} sm_{r['arch']} {r['dtype']} "
                  f"V={r['vocab']}: {'; '.join(r['violations'])}")
    for backend, s in summary(rows).items():
        print(f"{backend}: {s['rows']} rows, {s['compiled']} compiled, {s['with_violations']} with violations; "
              f"max registers {s['max_registers']}, max spill (non-fp64) {s['max_spill_bytes_non_fp64']} B, "
              f"max SASS instructions/element (non-fp64) {s['max_instr_per_elem_non_fp64']}")
    if args.json:
        print(f"wrote {args.json}")
    return 1 if bad or not rows else 0


def cmd_train(args) -> int:
    from .trainers.distributed import shutdown

    try:
        rc = _train(args)
    except BaseException:
        shutdown(barrier=False)  # the peers may never reach a barrier now
        raise
    shutdown()  # torchrun: leave the process group before the interpreter exits
    return rc


def _train(args) -> int:
    from .trainers import run_stage  # transformers is imported only here (the optional `train` extra)
    from .trainers.distributed import is_main

    if args.stage == "all":
        import os

        from .trainers.pipeline import format_report, run_all

        if args.model or args.reward_model:
            print("fastpo train: error: `all` builds every model itself (no --model / --reward-model)",
                  file=sys.stderr)
            return 2
        out = args.out or "fastpo-runs"
        try:
            report = run_all(out, steps=args.steps, seed=args.seed, sft_steps=args.sft_steps,
                             eval_prompts=args.eval_prompts, eval_every=args.eval_every, save_every=args.save_every,
                             resume=args.resume, progress=not args.no_progress)
        except (ValueError, FileNotFoundError) as e:
            print(f"fastpo train: error: {e}", file=sys.stderr)
            return 2
        if is_main():
            print(format_report(report))
            print(f"wrote {os.path.join(out, 'report.json')}")
        return 0
    try:
        summary = run_stage(args.stage, args.out or f"fastpo-runs/{args.stage}", model=args.model,
                            steps=args.steps, seed=args.seed, sft_steps=args.sft_steps,
                            eval_prompts=args.eval_prompts, eval_every=args.eval_every,
                            reward_model=args.reward_model, save_every=args.save_every, resume=args.resume,
                            progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastpo train: error: {e}", file=sys.stderr)
        return 2
    if not is_main():  # torchrun: rank 0 reports
        return 0
    before, after = summary["before"] or {}, summary["after"] or {}
    if summary["stage"] == "rm":
        print(f"rm: {summary['steps']} steps in {summary['seconds']:.1f} s; held-out pair accuracy "
              f"{before.get('pair_accuracy', float('nan')):.3f} -> {after.get('pair_accuracy', float('nan')):.3f} "
              f"(margin {after.get('margin', float('nan')):.2f})")
        return 0
    print(f"{summary['stage']}: {summary['steps']} steps in {summary['seconds']:.1f} s; greedy accuracy "
          f"{before.get('accuracy', float('nan')):.3f} -> {after.get('accuracy', float('nan')):.3f} "
          f"(hard {after.get('hard_accuracy', float('nan')):.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    import fastpo  # noqa: F401  (sets up the Triton interpreter before triton is imported)

    parser = argparse.ArgumentParser(prog="fastpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="every op x backend x dtype against the float64 reference")
    v.add_argument("--device", default=_default_device())
    v.add_argument("--ops", nargs="*", help="restrict to these ops (default: all)")
    v.add_argument("--json", help="also write the results as JSON to this path")
    b = sub.add_parser("bench", help="micro-benchmarks: median time, GB/s, peak extra memory")
    b.add_argument("--device", default=_default_device())
    b.add_argument("--ops", nargs="*", help="restrict to these ops (default: all but the opt-in trl_head, "
                   "TRL's fused LM head vs fastpo's: --ops trl_head)")
    b.add_argument("--shapes", help="override shapes, e.g. 2048x32000xbfloat16,1024x128256xfloat32")
    b.add_argument("--json", default="fastpo-bench.json", help="where to write the JSON results")
    b.add_argument("--png", help="also plot the timings to this PNG (needs matplotlib)")
    a = sub.add_parser("aot", help="compile every Triton and CUDA kernel for sm_80/sm_90 (no GPU) and check it")
    a.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    a.add_argument("--json", help="also write the report (environment, summary, rows) as JSON")
    a.add_argument("--python", help="compile the Triton kernels with this interpreter (another triton version)")
    only = a.add_mutually_exclusive_group()
    only.add_argument("--triton-only", action="store_true")
    only.add_argument("--cuda-only", action="store_true")
    t = sub.add_parser("train", help="train the embedded default (addition, tiny Llama): sft, rm, ppo, grpo, "
                       "dpo or all")
    t.add_argument("stage", choices=("sft", "rm", "ppo", "grpo", "dpo", "all"),
                   help="one stage, or all of them in sequence into --out/<stage> plus report.json")
    t.add_argument("--model", help="start from this model dir (default: a fresh model for sft, <out parent>/sft "
                   "otherwise, trained first if missing)")
    t.add_argument("--out", help="output dir (default fastpo-runs/STAGE)")
    t.add_argument("--steps", type=int, help="training steps (default: the stage's config)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sft-steps", type=int, help="steps of the SFT run made when <out parent>/sft is missing")
    t.add_argument("--eval-prompts", type=int, default=400, help="fresh prompts per greedy evaluation")
    t.add_argument("--eval-every", type=int, help="steps between evaluations (0: before and after only)")
    t.add_argument("--reward-model", help="ppo: optimise this reward model dir's score instead of the task reward "
                   "(from `fastpo train rm`)")
    t.add_argument("--save-every", type=int, default=0, metavar="K",
                   help="write a checkpoint to OUT/checkpoint every K steps (0: none)")
    t.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint (an error if there is none; `all`: finished stages "
                   "are kept)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")
    args = parser.parse_args(argv)
    return {"verify": cmd_verify, "bench": cmd_bench, "aot": cmd_aot, "train": cmd_train}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
