"""Compile report of the hand-written CUDA kernels (csrc/cuda), without a GPU.

Each ``.cu`` file is compiled once per architecture to a cubin with setup.py's nvcc
flags (csrc/nvcc_flags.py) and ``-Xptxas -v``; ptxas's lines give registers, spills
and static shared memory per kernel instantiation, the cubin's ELF info gives the
block size bound (``__launch_bounds__``), and its SASS (``cuobjdump -sass``) gives
the width of the global loads and stores inside the vocabulary loop and the
instructions that loop issues per element.

The vocabulary loop of a kernel is found in the SASS as the backward branch whose
body holds the most elements of global loads; its ``instr_per_elem`` is the static
instruction count of that body divided by the elements its loads bring in (a pack
of 16 bytes is 8 bf16 elements). Rows: one per kernel x dtype x arch x template
variant. ``collect`` needs nvcc and cuobjdump (CUDA's, or the copy in triton's wheel),
not a GPU. ``python -m fastpo.aot.cuda_report --arch 80,90`` prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["collect", "nvcc_path", "cuobjdump_path", "parse_ptxas", "parse_sass_loops"]

REGS_PER_SM = 65536
MIN_BLOCKS_PER_SM = 2

_DTYPES = {"float": "fp32", "double": "fp64", "__nv_bfloat16": "bf16", "__half": "fp16"}
_ELEM_BYTES = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2}
# template flags after the dtype, by kernel (for readable variant names)
_FLAG_NAMES = {
    "token_logprobs_bwd_kernel": ["entropy_grad"],
    "policy_loss_fwd_kernel": ["write_grad", "entropy_grad"],
}
# kernels that stream a row of V logits (must use 128-bit loads) / write a gradient row (128-bit stores)
_STREAMING = {"token_logprobs_fwd_kernel", "token_logprobs_bwd_kernel", "policy_loss_fwd_kernel",
              "sequence_lse_kernel", "sequence_bwd_kernel"}


def _repo_csrc() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "csrc"


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def cuobjdump_path() -> str | None:
    """CUDA's cuobjdump, else the one in triton's wheel (triton/backends/nvidia/bin)."""
    nvcc = nvcc_path()
    candidates = [shutil.which("cuobjdump")]
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "cuobjdump"))
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if c and Path(c).exists()), None)


# ------------------------------------------------------------------ parsers
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, dict]:
    """{mangled name: {registers, spill_bytes, shared_bytes}} from ``-Xptxas -v`` output."""
    out: dict[str, dict] = {}
    name = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            name = m.group(1)
            out[name] = {"registers": 0, "spill_bytes": 0, "shared_bytes": 0}
            continue
        if name is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            out[name]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = _PTXAS_REGS.search(line)
        if m:
            out[name]["registers"] = int(m.group(1))
            m = _PTXAS_SMEM.search(line)
            out[name]["shared_bytes"] = int(m.group(1)) if m else 0
    return out


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_GLOBAL = re.compile(r"\b(LDG|STG)((?:\.\w+)*)\s")


def _width(mods: str) -> int:
    for bits in ("128", "64"):
        if f".{bits}" in mods:
            return int(bits)
    if ".U16" in mods or ".S16" in mods:
        return 16
    if ".U8" in mods or ".S8" in mods:
        return 8
    return 32


def _split_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _SASS_INSTR.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def parse_sass_loops(instrs: list[tuple[int, str]]) -> list[dict]:
    """Loops of one function's SASS (backward branches): address range, instruction count,
    and the global loads / stores inside, as lists of widths in bits."""
    loops = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if not m or m.group(1) is None:
            continue
        target = int(m.group(1), 16)
        if target > addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr]
        loads = [_width(g.group(2)) for t in body for g in [_GLOBAL.search(t)] if g and g.group(1) == "LDG"]
        stores = [_width(g.group(2)) for t in body for g in [_GLOBAL.search(t)] if g and g.group(1) == "STG"]
        loops.append({"start": target, "end": addr, "instructions": len(body), "loads": loads, "stores": stores})
    return loops


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _describe(demangled: str) -> tuple[str, str, str]:
    """(kernel, dtype, variant) from ``void ns::kernel<T, true, false>(...)``."""
    m = re.search(r"(\w+)<([^()]*)>\(", demangled)
    if not m:
        return demangled.split("(")[0].split("::")[-1], "?", ""
    kernel, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    dtype = _DTYPES.get(args[0], args[0])
    flags = args[1:]
    names = _FLAG_NAMES.get(kernel, [])
    if len(names) != len(flags):  # another revision's templates: positional names
        names = [f"arg{i}" for i in range(len(flags))]
    variant = ",".join(f"{n}={1 if f == 'true' else 0 if f == 'false' else f}" for n, f in zip(names, flags))
    return kernel, dtype, variant


def _max_threads(elf: str) -> dict[str, int]:
    """Block size bound of each function (EIATTR_MAX_THREADS in .nv.info.<function>)."""
    out, cur = {}, None
    lines = elf.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\.nv\.info\.(\S+)", line)
        if m:
            cur = m.group(1)
        if "EIATTR_MAX_THREADS" in line and cur:
            for nxt in lines[i + 1:i + 4]:
                v = re.search(r"Value:\s+0x([0-9a-f]+)", nxt)
                if v:
                    out[cur] = int(v.group(1), 16)
                    break
    return out


# ------------------------------------------------------------------ compile
def _compile(nvcc: str, cuobjdump: str, src: Path, arch: int, flags: list[str], tmp: Path) -> dict:
    cubin = tmp / f"{src.stem}.sm{arch}.cubin"
    cmd = [nvcc, "-cubin", "-o", str(cubin), str(src), *flags, f"-arch=sm_{arch}", "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip()[-2000:]}
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
    elf = subprocess.run([cuobjdump, "-elf", str(cubin)], capture_output=True, text=True).stdout
    return {"ptxas": parse_ptxas(res.stderr + res.stdout), "sass": _split_sass(sass), "threads": _max_threads(elf)}


def _alloc_regs(regs: int) -> int:
    """Registers a thread really takes: allocated per warp in units of 256 (8 per thread)."""
    return (max(regs, 1) + 7) // 8 * 8


def _row(arch: int, name: str, demangled: str, info: dict, sass: list, threads: int) -> dict:
    kernel, dtype, variant = _describe(demangled)
    loops = [lp for lp in parse_sass_loops(sass) if lp["loads"]]
    elem_bits = 8 * _ELEM_BYTES.get(dtype, 4)
    load_bits = store_bits = instr_per_elem = None
    if loops:
        # the vocabulary loop: the first (in address order) of those with the widest loads
        widest = max(max(lp["loads"]) for lp in loops)
        hot = min((lp for lp in loops if max(lp["loads"]) == widest), key=lambda lp: lp["start"])
        load_bits = widest
        # stores of the vocabulary loops (those with the widest loads: pass 2 of the policy kernel)
        stores = [w for lp in loops if max(lp["loads"]) == widest for w in lp["stores"]]
        store_bits = max(stores) if stores else None
        elems = sum(w // elem_bits for w in hot["loads"] if w >= elem_bits)
        instr_per_elem = round(hot["instructions"] / elems, 2) if elems else None
    row = {
        "backend": "cuda", "kernel": kernel, "variant": variant, "arch": arch, "dtype": dtype, "vocab": None,
        "compiled": True, "error": None, "registers": info["registers"], "spill_bytes": info["spill_bytes"],
        "shared_bytes": info["shared_bytes"], "threads": threads, "load_bits": load_bits,
        "store_bits": store_bits, "instr_per_elem": instr_per_elem, "violations": [],
    }
    v = row["violations"]
    if dtype in ("fp32", "bf16", "fp16") and info["spill_bytes"] > 0:
        v.append(f"spills {info['spill_bytes']} bytes")
    if _alloc_regs(info["registers"]) * threads * MIN_BLOCKS_PER_SM > REGS_PER_SM:
        v.append(f"{info['registers']} registers x {threads} threads: < {MIN_BLOCKS_PER_SM} blocks per SM")
    if kernel in _STREAMING and load_bits != 128:
        v.append(f"vocabulary loop loads are {load_bits} bits, not 128")
    writes_grad = kernel in ("token_logprobs_bwd_kernel", "sequence_bwd_kernel") or "write_grad=1" in variant
    if writes_grad and store_bits != 128:
        v.append(f"gradient stores are {store_bits} bits, not 128")
    return row


def collect(archs: list[int], *, sources: list[str] | None = None, csrc: str | Path | None = None) -> list[dict]:
    """One row per CUDA kernel instantiation x arch (see the module docstring for the keys).

    ``sources``: stems of the .cu files to compile (default: all of csrc/cuda); ``csrc``: another
    source tree with the same layout (e.g. an older revision, for before/after numbers).
    """
    csrc = Path(csrc) if csrc else _repo_csrc()
    nvcc, cuobjdump = nvcc_path(), cuobjdump_path()
    files = sorted(p for p in (csrc / "cuda").glob("*.cu") if sources is None or p.stem in sources)
    if nvcc is None or cuobjdump is None:
        missing = "nvcc" if nvcc is None else "cuobjdump"
        return [{"backend": "cuda", "kernel": p.stem, "variant": "", "arch": a, "dtype": "", "vocab": None,
                 "compiled": False, "error": f"{missing} not found", "registers": 0, "spill_bytes": 0,
                 "shared_bytes": 0, "threads": 0, "load_bits": None, "store_bits": None,
                 "instr_per_elem": None, "violations": ["did not compile"]} for p in files for a in archs]
    flags_file = csrc / "nvcc_flags.py"
    flags = runpy.run_path(str(flags_file))["NVCC_FLAGS"] if flags_file.exists() else ["-O3", "-std=c++17"]
    jobs = [(p, int(a)) for a in archs for p in files]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastpo-aot-") as tmp, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda j: _compile(nvcc, cuobjdump, j[0], j[1], flags, Path(tmp)), jobs))
    for (src, arch), res in zip(jobs, results):
        if "error" in res:
            rows.append({"backend": "cuda", "kernel": src.stem, "variant": "", "arch": arch, "dtype": "",
                         "vocab": None, "compiled": False, "error": res["error"], "registers": 0, "spill_bytes": 0,
                         "shared_bytes": 0, "threads": 0, "load_bits": None, "store_bits": None,
                         "instr_per_elem": None, "violations": ["did not compile"]})
            continue
        names = _demangle(sorted(res["ptxas"]))
        for name in sorted(res["ptxas"], key=lambda n: names[n]):
            threads = res["threads"].get(name, 1024)
            rows.append(_row(arch, name, names[name], res["ptxas"][name], res["sass"].get(name, []), threads))
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'kernel':28s} {'variant':27s} {'sm':>3s} {'dtype':5s} {'regs':>4s} {'spill':>5s} {'smem':>5s} " \
           f"{'thr':>4s} {'ld':>4s} {'st':>4s} {'i/elem':>6s}  violations"
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
        lines.append(f"{r['kernel'][:28]:28s} {r['variant'][:27]:27s} {r['arch']:>3d} {r['dtype']:5s} "
                     f"{r['registers']:>4d} {r['spill_bytes']:>5d} {r['shared_bytes']:>5d} {r['threads']:>4d} "
                     f"{fmt(r['load_bits']):>4s} {fmt(r['store_bits']):>4s} {fmt(r['instr_per_elem']):>6s}  "
                     f"{'; '.join(r['violations']) or 'ok'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    ap.add_argument("--csrc", default=None, help="another csrc/ tree (default: this checkout's)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    rows = collect([int(x) for x in a.arch.split(",") if x], csrc=a.csrc)
    print(_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    bad = sum(bool(r["violations"]) for r in rows)
    print(f"\n{len(rows)} kernel instantiations, {bad} with violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
