"""Compile report of every Triton kernel for sm_80/sm_90, without a GPU.

Each kernel is compiled **through its real launcher**: the launcher is called on small CPU
tensors with the shapes, dtypes, strides and alignments of a production call, and the
kernel's ``run`` is replaced by a recorder, so the arguments, constexprs, ``num_warps`` and
launch options are exactly those a GPU launch would pass. The signature and specialisation
are then derived with Triton's own binder (``create_function_from_signature`` +
``JITFunction._pack_args``, the code ``JITFunction.run`` uses): pointer dtypes, i32/i64
ints, ints equal to 1 made constexpr, ``tt.divisibility=16`` of pointers, ints and strides.
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` then yields PTX and a
cubin; the wheel's ``cuobjdump``/``nvdisasm`` give registers, spills, shared memory and SASS.

Hot loops: the SASS backward branches whose body holds a global load (LDG). A loop without a
store is a pass-1 (logsumexp) loop, one with a store a gradient loop; ``instr_per_elem`` is
the body's static instruction count over the elements its loads bring in per thread
(Σ load bytes / element size), the max over the kernel's hot loops (each is named, with its
value, in ``variant``). ``load_bits``/``store_bits``: the narrowest global load/store in the
hot loops (kernels without a loop: the widest, i.e. their vector body).

Asserted (``violations``): compiled; no spills for fp32/bf16/fp16; ≥ 2 blocks/SM by registers;
128-bit loads/stores in the hot loops when V % 8 == 0 and rows are 16-byte aligned; for each
kernel writing the gradient during its forward (policy, WRITE_GRAD), no global load of the
logits between the last ``bar.sync`` preceding the gradient loop and that loop (issue 8,
defect 1: checked on the PTX by tracking which registers derive from the logits parameter);
no fp32 scalar argument in a float64 kernel (an untyped Python float binds as fp32, so a
clip bound or coefficient would be rounded to fp32 in the gradcheck path; the interpreter of
some Triton versions passes the Python float through and hides it);
≤ 16 SASS instructions per element in the token forward and policy pass-1 loops on sm_90
(fp32/bf16/fp16; float64 is the gradcheck path: its exp2 is libdevice's ~40-instruction
polynomial, reported but not asserted, like its spills).

V values: the hot loops depend on V only through BLOCK_V (4096 for every V here) and Triton's
16-divisibility of V/strides, so 32000, 128256 and 151936 share one binary per variant (cached,
reported under each V) and 50257 gets its own. Constexpr variants beyond the main ones, and the
2-D / misaligned-base / odd-row-stride layouts, are compiled for fp32 and bf16 at V = 32000.

Runs in a subprocess with ``TRITON_INTERPRET=0`` (in a process that imported fastpo under the
interpreter the kernels are interpreter objects): ``python -m fastpo.aot.triton_report --arch
80,90 [--json FILE|-]``; ``collect`` does that for you, sharded over two processes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["collect", "defect1_loads", "parse_sass", "hot_loops", "ROW_KEYS"]

ROW_KEYS = ("backend", "kernel", "variant", "arch", "dtype", "vocab", "compiled", "error", "registers",
            "spill_bytes", "shared_bytes", "threads", "load_bits", "store_bits", "instr_per_elem", "violations")
REGS_PER_SM = 65536
VOCABS = (32000, 50257, 128256, 151936)
DTYPES = ("fp32", "bf16", "fp16", "fp64")
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
MAX_INSTR_PER_ELEM = 16.0
ALIGNED_LAYOUTS = ("2d", "3d-shift")


# ----------------------------------------------------------------------------- SASS / PTX parsing
def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    return str(path) if path.exists() else name


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def parse_sass(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """``(instructions [(address, text)], labels {name: address})`` of nvdisasm output."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2).strip()))
    return instrs, labels


def _opcode(ins: str) -> str:
    parts = ins.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def _width(op: str) -> int:
    mods = op.split(".")[1:]
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if token in mods:
            return bits
    return 32


def hot_loops(instrs: list[tuple[int, str]], labels: dict[str, int], elem_bytes: int) -> list[dict]:
    """Loops (backward branches) whose body holds a global load, with their per-element cost."""
    loops = []
    for addr, ins in instrs:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
        if not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        body = [(a, i) for a, i in instrs if labels[m.group(1)] <= a <= addr]
        ops = [_opcode(i) for _, i in body]
        loads = [op for op in ops if op.startswith("LDG") or op.startswith("LDGSTS")]
        if not loads:
            continue
        stores = [op for op in ops if op.startswith("STG")]
        elems = sum(_width(op) for op in loads) / 8 / elem_bytes
        loops.append({
            "kind": "grad" if stores else "pass1",
            "instructions": sum(1 for op in ops if op != "NOP"),
            "elements": elems,
            "instr_per_elem": round(sum(1 for op in ops if op != "NOP") / elems, 2),
            "load_bits": min(_width(op) for op in loads),
            "store_bits": min(_width(op) for op in stores) if stores else None,
        })
    return loops


def _resources(cubin_path: str) -> dict:
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    get = lambda key: int(re.search(rf"\b{key}:(\d+)", out).group(1))  # noqa: E731
    return {"registers": get("REG"), "spill_bytes": get("STACK") + get("LOCAL"), "shared_bytes": get("SHARED")}


_PTX_REG = re.compile(r"%[a-z]+\d+")


def defect1_loads(ptx: str, logits_param: int, grad_param: int) -> list[str]:
    """Global loads of the logits between the last ``bar.sync`` before the gradient loop and
    that loop (other than the loop's own read-then-write): the defect-1 hazard (another warp
    may already be overwriting the row in place). The gradient loop is the first PTX loop that
    both loads from the logits and stores to the gradient; provenance of addresses is tracked
    from the two pointer parameters through register arithmetic (not through loaded values)."""
    lines = [ln.split("//")[0].strip() for ln in ptx.split(".section")[0].splitlines()]
    name = re.search(r"\.entry\s+(\w+)", ptx).group(1)
    params = {f"{name}_param_{logits_param}": "logits", f"{name}_param_{grad_param}": "grad"}
    taint: dict[str, set] = {}
    for _ in range(4):  # loop-carried registers: iterate to a fixed point
        for ln in lines:
            body = ln
            if body.startswith("@"):
                body = body.split(None, 1)[1] if " " in body else ""
            op = body.split()[0] if body.split() else ""
            if op.startswith("ld.param"):
                m = re.search(r"(%\w+),\s*\[(\w+)\]", body)
                if m and m.group(2) in params:
                    taint.setdefault(m.group(1), set()).add(params[m.group(2)])
                continue
            if not op or op.startswith(("ld.", "st.", "bar", "bra", "ret", "setp", "atom", "red.")):
                continue
            regs = _PTX_REG.findall(body)
            if len(regs) >= 2:
                src = set().union(*(taint.get(r, set()) for r in regs[1:]))
                if src:
                    taint.setdefault(regs[0], set()).update(src)

    def addr_taint(ln: str) -> set:
        m = re.search(r"\[\s*(%\w+)", ln)
        return taint.get(m.group(1), set()) if m else set()

    label_at = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\$L\w+:$", ln)}
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", ln)
        if m and label_at.get(m.group(1), i + 1) < i:
            loops.append((label_at[m.group(1)], i))
    for start, end in sorted(loops):
        body = lines[start:end + 1]
        if any(re.search(r"\bld\.global", b) and "logits" in addr_taint(b) for b in body) and any(
                re.search(r"\bst\.global", b) and "grad" in addr_taint(b) for b in body):
            break
    else:
        return []
    bars = [i for i in range(start) if re.search(r"\bbar\.sync\b|\bbarrier\.sync\b", lines[i])]
    if not bars:
        return []
    return [lines[i] for i in range(bars[-1] + 1, start)
            if re.search(r"\bld\.global", lines[i]) and "logits" in addr_taint(lines[i])]


# ----------------------------------------------------------------------------- launch capture
class _Recorder:
    def __init__(self, kernels):
        self.kernels, self.calls = kernels, []

    def __enter__(self):
        for k in self.kernels:
            def run(*args, grid, warmup, _k=k, **kwargs):
                self.calls.append((_k, args, kwargs))
            k.run = run
        return self

    def __exit__(self, *exc):
        for k in self.kernels:
            del k.run


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[name]


def _logits(dtype, v, layout):
    """Small CPU logits with the strides/alignment of a production call (never initialised)."""
    import torch

    dt = _torch_dtype(dtype)
    if layout == "2d":
        return torch.empty(2, v, dtype=dt)
    if layout == "3d-shift":  # logits[:, :-1] of the model output [B, T, V]
        return torch.empty(2, 3, v, dtype=dt)[:, :-1]
    if layout == "misaligned-base":  # base one element past a 16-byte boundary
        return torch.empty(2 * v + 8, dtype=dt)[1:1 + 2 * v].view(2, v)
    if layout == "odd-stride":  # rows of a wider buffer: row stride V + 1
        return torch.empty(2, v + 1, dtype=dt)[:, :v]
    raise ValueError(layout)


def _cases():
    """(kernel, variant, dtype, V, layout, launch()) for every report row."""
    import torch

    from fastpo.config import PolicyLossConfig
    from fastpo.kernels import policy_loss as pl
    from fastpo.kernels import token_logprobs as tk
    from fastpo.kernels.policy_args import PolicyKernelArgs

    def acc(dtype):
        return torch.float64 if dtype == "fp64" else torch.float32

    def token_fwd(dtype, v, layout, **_):
        x = _logits(dtype, v, layout)
        n = x.numel() // v
        return lambda: tk.token_logprobs_fwd(x, torch.zeros(n, dtype=torch.long), 0.7, -100)

    def token_bwd(dtype, v, layout, has_ge, inplace=False, **_):
        x = _logits(dtype, v, layout)
        n = x.numel() // v
        vec = torch.zeros(n, dtype=acc(dtype))
        out = x if inplace else torch.empty(x.shape, dtype=x.dtype)
        return lambda: tk.token_logprobs_bwd(x, torch.zeros(n, dtype=torch.long), vec, vec, vec,
                                             vec if has_ge else None, 0.7, -100, out)

    def policy(dtype, v, layout, config, write_grad, has_ref, inplace=False, weights=False, **_):
        x = _logits(dtype, v, layout)
        n = x.numel() // v
        vec = torch.zeros(n, dtype=acc(dtype))
        args = PolicyKernelArgs.from_config(config, has_ref=has_ref, ignore_index=-100)
        grad = (x if inplace else torch.empty(x.shape, dtype=x.dtype)) if write_grad else None
        w = vec if weights else None  # policy_w, kl_w, ent_w
        return lambda: pl.policy_loss_fwd(x, torch.zeros(n, dtype=torch.long), vec, vec,
                                          vec if has_ref else None, vec, args, grad, w, w, w)

    main_policy = [  # (name, config, write_grad, has_ref): the two hot-loop shapes
        ("ppo+entropy,grad", PolicyLossConfig(entropy_coef=0.01), True, False),
        ("ppo,nograd", PolicyLossConfig(), False, False),
    ]
    other_policy = [  # every other constexpr value at least once
        ("ppo+dual+k3+entropy,grad", PolicyLossConfig(dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
                                                      entropy_coef=0.01), True, True),
        ("cispo+k1,grad", PolicyLossConfig(variant="cispo", kl_coef=0.1, kl_estimator="k1"), True, True),
        ("ppo+k2+,grad", PolicyLossConfig(kl_coef=0.1, kl_estimator="k2+"), True, True),
        ("ppo+abs,grad", PolicyLossConfig(kl_coef=0.1, kl_estimator="abs"), True, True),
        ("cispo+entropy,nograd", PolicyLossConfig(variant="cispo", entropy_coef=0.01), False, False),
        ("sapo+entropy,grad", PolicyLossConfig(variant="sapo", entropy_coef=0.01), True, False),
        ("pg,grad", PolicyLossConfig(variant="pg"), True, False),
    ]
    weighted_policy = [  # token-local weights policy_w, kl_w, ent_w and the ratio-weighted KL
        ("ppo+k3w+entropy,grad,weights", PolicyLossConfig(kl_coef=0.1, kl_estimator="k3", kl_importance_weighted=True,
                                                          entropy_coef=0.01), True, True),
    ]
    cases = []
    for dtype in DTYPES:
        for v in VOCABS:
            cases.append(("token_logprobs_fwd", "3d-shift", dtype, v, token_fwd(dtype, v, "3d-shift")))
            for ge in (False, True):
                cases.append(("token_logprobs_bwd", f"3d-shift,HAS_GRAD_ENTROPY={int(ge)}", dtype, v,
                              token_bwd(dtype, v, "3d-shift", ge)))
            for name, cfg, wg, ref in main_policy:
                cases.append(("policy_loss_fwd", f"3d-shift,{name}", dtype, v, policy(dtype, v, "3d-shift", cfg, wg, ref)))
    for dtype in ("fp32", "bf16"):
        v = 32000
        cases.append(("token_logprobs_bwd", "3d-shift,HAS_GRAD_ENTROPY=1,inplace", dtype, v,
                      token_bwd(dtype, v, "3d-shift", True, inplace=True)))
        cases.append(("policy_loss_fwd", "3d-shift,ppo+entropy,grad,inplace", dtype, v,
                      policy(dtype, v, "3d-shift", *main_policy[0][1:], inplace=True)))
        for name, cfg, wg, ref in other_policy:
            cases.append(("policy_loss_fwd", f"3d-shift,{name}", dtype, v, policy(dtype, v, "3d-shift", cfg, wg, ref)))
        for name, cfg, wg, ref in weighted_policy:
            cases.append(("policy_loss_fwd", f"3d-shift,{name}", dtype, v,
                          policy(dtype, v, "3d-shift", cfg, wg, ref, weights=True)))
        for layout in ("2d", "misaligned-base", "odd-stride"):
            cases.append(("token_logprobs_fwd", layout, dtype, v, token_fwd(dtype, v, layout)))
            cases.append(("token_logprobs_bwd", f"{layout},HAS_GRAD_ENTROPY=1", dtype, v, token_bwd(dtype, v, layout, True)))
            cases.append(("policy_loss_fwd", f"{layout},ppo+entropy,grad", dtype, v,
                          policy(dtype, v, layout, *main_policy[0][1:])))
    try:  # the upstream-gradient scale kernel (no vocabulary loop: one block per program)
        from fastpo.kernels import grad_scale as gs

        for dtype in DTYPES:
            for v in (32000, 50257):
                x = _logits(dtype, v, "3d-shift")
                one = torch.ones(1, dtype=acc(dtype))
                cases.append(("scale_grad_inplace", "3d-shift", dtype, v,
                              (lambda x=x, one=one: gs.scale_grad_inplace(x, one, one))))
    except ImportError:
        pass
    return cases


def _all_kernels():
    from fastpo.kernels import policy_loss as pl
    from fastpo.kernels import token_logprobs as tk

    ks = [tk._token_logprobs_fwd_kernel, tk._token_logprobs_bwd_kernel, pl._policy_loss_fwd_kernel]
    try:
        from fastpo.kernels import grad_scale as gs

        ks.append(gs._scale_grad_kernel)
    except ImportError:
        pass
    return ks


def _specialise(kernel, args, kwargs, arch):
    """Triton's own binder: (options, signature, constexprs, attrs) of a launch for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return target, options, signature, constexprs, attrs


def _analyse(kernel, args, kwargs, arch, dtype):
    import triton
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs = _specialise(kernel, args, kwargs, arch)
    res = {"compiled": False, "error": None, "registers": 0, "spill_bytes": 0, "shared_bytes": 0,
           "threads": options.num_warps * 32, "loops": [], "load_bits": None, "store_bits": None,
           "defect1": [], "fp32_scalars": [n for n, t in signature.items() if t == "fp32"]}
    try:
        cc = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 (reported, not raised)
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
        return res
    res["compiled"] = True
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cc.asm["cubin"])
        res.update(_resources(path))
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    instrs, labels = parse_sass(sass)
    res["loops"] = hot_loops(instrs, labels, ELEM_BYTES[dtype])
    if res["loops"]:
        res["load_bits"] = min(lp["load_bits"] for lp in res["loops"])
        stores = [lp["store_bits"] for lp in res["loops"] if lp["store_bits"]]
        res["store_bits"] = min(stores) if stores else None
    else:
        ops = [_opcode(i) for _, i in instrs]
        lds = [_width(op) for op in ops if op.startswith("LDG")]
        sts = [_width(op) for op in ops if op.startswith("STG")]
        res["load_bits"], res["store_bits"] = (max(lds) if lds else None), (max(sts) if sts else None)
    if constexprs and _constexpr_by_name(kernel, constexprs).get("WRITE_GRAD"):
        names = [n for n, t in signature.items() if t != "constexpr"]
        res["defect1"] = defect1_loads(cc.asm["ptx"], names.index("logits_ptr"), names.index("grad_ptr"))
    return res


def _constexpr_by_name(kernel, constexprs):
    names = [p.name for p in kernel.params]
    return {names[k[0] if isinstance(k, tuple) else k] if not isinstance(k, str) else k: v
            for k, v in constexprs.items()}


def _key(kernel, arch, args, kwargs):
    target, options, signature, constexprs, attrs = _specialise(kernel, args, kwargs, arch)
    opts = {k: v for k, v in sorted(options.__dict__.items()) if isinstance(v, (int, float, bool, str))}
    return json.dumps([kernel.fn.__name__, arch, signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                       sorted((str(k), repr(v)) for k, v in attrs.items()), opts], sort_keys=True, default=str)


def _row(case, arch, res):
    kernel, variant, dtype, vocab = case[:4]
    loops = res["loops"]
    if loops:
        variant += "|" + ",".join(f"{lp['kind']}={lp['instr_per_elem']}" for lp in loops)
    ipe = max((lp["instr_per_elem"] for lp in loops), default=None)
    row = {"backend": "triton", "kernel": kernel, "variant": variant, "arch": arch, "dtype": dtype, "vocab": vocab,
           "compiled": res["compiled"], "error": res["error"], "registers": res["registers"],
           "spill_bytes": res["spill_bytes"], "shared_bytes": res["shared_bytes"], "threads": res["threads"],
           "load_bits": res["load_bits"], "store_bits": res["store_bits"], "instr_per_elem": ipe, "violations": []}
    v = row["violations"]
    if not res["compiled"]:
        v.append(f"did not compile: {res['error']}")
        return row
    if dtype != "fp64" and res["spill_bytes"] > 0:
        v.append(f"spills {res['spill_bytes']} bytes")
    if res["registers"] * res["threads"] * 2 > REGS_PER_SM:
        v.append(f"{res['registers']} registers x {res['threads']} threads: < 2 blocks/SM")
    aligned = vocab % 8 == 0 and variant.split(",")[0].split("|")[0] in ALIGNED_LAYOUTS
    if aligned:
        if res["load_bits"] is not None and res["load_bits"] < 128:
            v.append(f"{res['load_bits']}-bit loads in the vocabulary loop")
        if res["store_bits"] is not None and res["store_bits"] < 128:
            v.append(f"{res['store_bits']}-bit stores in the vocabulary loop")
    for ld in res["defect1"]:
        v.append(f"logits load after the last barrier before the gradient loop: {ld}")
    if dtype == "fp64" and res.get("fp32_scalars"):  # an untyped Python float is an fp32 argument
        v.append(f"fp32 scalar arguments in a float64 kernel: {', '.join(res['fp32_scalars'])}")
    if arch == 90 and dtype != "fp64" and kernel in ("token_logprobs_fwd", "policy_loss_fwd"):
        for lp in loops:
            if lp["kind"] == "pass1" and lp["instr_per_elem"] > MAX_INSTR_PER_ELEM:
                v.append(f"pass-1 loop: {lp['instr_per_elem']} SASS instructions/element > {MAX_INSTR_PER_ELEM:g}")
    return row


def _collect_here(archs, shard=0, shards=1, select=None):
    """In this process (TRITON_INTERPRET must be 0): the rows of this shard (of the cases
    ``select((kernel, variant, dtype, vocab))`` keeps, default all)."""
    kernels = _all_kernels()
    captured = []
    for case in _cases():
        if select is not None and not select(case[:4]):
            continue
        with _Recorder(kernels) as rec:
            case[4]()
        if len(rec.calls) != 1:
            raise RuntimeError(f"{case[0]} {case[1]}: the launcher made {len(rec.calls)} launches")
        captured.append((case, rec.calls[0]))
    keys, order = {}, []
    for case, (k, args, kwargs) in captured:
        for arch in archs:
            key = _key(k, arch, args, kwargs)
            if key not in keys:
                keys[key] = len(keys)
            order.append((case, arch, key, k, args, kwargs))
    done, rows = {}, []
    for case, arch, key, k, args, kwargs in order:
        if keys[key] % shards != shard:
            continue
        if key not in done:
            done[key] = _analyse(k, args, kwargs, arch, case[2])
        rows.append(_row(case, arch, done[key]))
    return rows


def collect(archs: list[int], *, shards: int | None = None, python: str | None = None) -> list[dict]:
    """Compile every Triton kernel through its launcher for each arch; one row per
    kernel x variant x dtype x V x arch (keys ``ROW_KEYS``). Runs in subprocesses with
    ``TRITON_INTERPRET=0`` (``shards`` of them, default min(2, CPUs)), with ``python`` (default
    this interpreter: run it with another venv's python for another triton version)."""
    shards = shards or max(1, min(2, os.cpu_count() or 1))
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    arch_arg = ",".join(str(a) for a in archs)
    procs = [subprocess.Popen([python or sys.executable, "-m", "fastpo.aot.triton_report", "--arch", arch_arg,
                               "--json", "-", "--shard", f"{i}/{shards}"], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"triton_report subprocess failed ({p.returncode}):\n{err[-4000:]}")
        rows += json.loads(out)
    key = lambda r: (r["kernel"], r["variant"].split("|")[0], r["dtype"], r["vocab"], r["arch"])  # noqa: E731
    return sorted(rows, key=key)


def table(rows: list[dict]) -> str:
    head = f"{'kernel':<20} {'variant':<58} {'arch':>4} {'dtype':<5} {'V':>6} {'reg':>4} {'spill':>5} " \
           f"{'smem':>5} {'ld':>4} {'st':>4} {'i/el':>6}  violations"
    lines = [head]
    for r in rows:
        lines.append(f"{r['kernel']:<20} {r['variant']:<58} {r['arch']:>4} {r['dtype']:<5} {r['vocab']:>6} "
                     f"{r['registers']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>5} {str(r['load_bits']):>4} "
                     f"{str(r['store_bits']):>4} {str(r['instr_per_elem']):>6}  {'; '.join(r['violations'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--json", default=None, help="write the rows as JSON to this file ('-': stdout)")
    ap.add_argument("--shard", default=None, help="i/n: only this shard (internal, used by collect)")
    a = ap.parse_args(argv)
    archs = [int(x) for x in a.arch.split(",")]
    t0 = time.time()
    if a.shard:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("run with TRITON_INTERPRET=0")
        i, n = (int(x) for x in a.shard.split("/"))
        print(json.dumps(_collect_here(archs, i, n)))
        return 0  # violations travel in the rows
    else:
        rows = collect(archs)
    if a.json == "-":
        print(json.dumps(rows))
    else:
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        print(table(rows))
        import triton

        bad = sum(bool(r["violations"]) for r in rows)
        print(f"triton {triton.__version__}: {len(rows)} rows, {bad} with violations, {time.time() - t0:.0f} s")
    return 1 if any(r["violations"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
