"""fastpo.aot.triton_report on this machine (no GPU): one kernel compiled for sm_90 through its
real launcher gives real numbers, and the defect-1 check (no load of the logits after the last
barrier before the in-place gradient loop) tells a bad ordering from a good one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastpo.aot.triton_report import ROW_KEYS

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
try:
    import triton.backends.nvidia as _nv

    _HAS_TOOLS = (Path(_nv.__file__).parent / "bin" / "nvdisasm").exists()
except ImportError:
    _HAS_TOOLS = False
pytestmark = pytest.mark.skipif(not _HAS_TOOLS, reason="triton's wheel without the NVIDIA backend tools")


def _run(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh process with compiled (not interpreted) Triton; it prints JSON."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_launcher_path_compiles_with_real_numbers(tmp_path):
    rows = _run("""
        import json
        from fastpo.aot.triton_report import ROW_KEYS, _collect_here
        pick = {("token_logprobs_fwd", "3d-shift", "bf16", 32000), ("policy_loss_fwd", "3d-shift,ppo+entropy,grad,inplace", "bf16", 32000)}
        print(json.dumps(_collect_here([90], select=lambda c: c in pick)))
    """, tmp_path)
    assert len(rows) == 2
    by_kernel = {r["kernel"]: r for r in rows}
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert r["compiled"] and r["error"] is None and r["arch"] == 90 and r["threads"] == 256
        assert 0 < r["registers"] <= 128 and r["spill_bytes"] == 0
        assert r["load_bits"] == 128  # aligned bf16 rows, V % 8 == 0: LDG.E.128 in the loop
        assert 0 < r["instr_per_elem"] <= 16
        assert r["violations"] == []
    assert by_kernel["policy_loss_fwd"]["store_bits"] == 128
    assert "pass1=" in by_kernel["policy_loss_fwd"]["variant"] and "grad=" in by_kernel["policy_loss_fwd"]["variant"]


def test_defect1_check_flags_a_late_logits_load(tmp_path):
    (tmp_path / "d1_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def late(x_ptr, g_ptr, label, V, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            s = tl.sum(tl.load(x_ptr + offs).to(tl.float32), 0)  # a block reduction: bar.sync
            xl = tl.load(x_ptr + label).to(tl.float32)  # defect 1: read after the last barrier
            for start in range(0, V, BLOCK):
                x = tl.load(x_ptr + start + offs).to(tl.float32)
                tl.store(g_ptr + start + offs, x - s - xl)

        @triton.jit
        def early(x_ptr, g_ptr, label, V, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            xl = tl.load(x_ptr + label).to(tl.float32)  # read before the reduction
            s = tl.sum(tl.load(x_ptr + offs).to(tl.float32), 0)
            for start in range(0, V, BLOCK):
                x = tl.load(x_ptr + start + offs).to(tl.float32)
                tl.store(g_ptr + start + offs, x - s - xl)
    '''))
    out = _run("""
        import json, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastpo.aot.triton_report import defect1_loads
        import d1_kernels as k
        sig = {"x_ptr": "*fp32", "g_ptr": "*fp32", "label": "i32", "V": "i32", "BLOCK": "constexpr"}
        res = {}
        for fn in (k.late, k.early):
            cc = triton.compile(ASTSource(fn, sig, {(4,): 1024}, {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            res[fn.__name__] = defect1_loads(cc.asm["ptx"], 0, 1)
        print(json.dumps(res))
    """, tmp_path)
    assert len(out["late"]) == 1 and "ld.global" in out["late"][0]
    assert out["early"] == []


def test_float64_kernels_take_no_fp32_scalars(tmp_path):
    """Every float64 policy-loss launch binds its runtime hyper-parameters as fp64 (an untyped
    Python float binds as fp32: 1 - clip_low, kl_coef, ... were ~1e-8 off in the gradcheck
    path, visible under the interpreter of triton 3.8 but not 3.9); and the report flags an
    fp32 scalar in a float64 kernel."""
    out = _run("""
        import json
        from fastpo.aot.triton_report import _collect_here, _row
        rows = _collect_here([90], select=lambda c: c[0] == "policy_loss_fwd" and c[2] == "fp64")
        case = ("policy_loss_fwd", "3d-shift", "fp64", 32000)
        res = {"compiled": True, "error": None, "registers": 64, "spill_bytes": 0, "shared_bytes": 0, "threads": 256,
               "loops": [], "load_bits": None, "store_bits": None, "defect1": [], "fp32_scalars": ["clip_low"]}
        flagged = _row(case, 90, res)["violations"]
        fp32 = _row(case[:2] + ("fp32",) + case[3:], 90, res)["violations"]
        print(json.dumps({"rows": rows, "flagged": flagged, "fp32": fp32}))
    """, tmp_path)
    assert out["rows"] and all(r["compiled"] and r["violations"] == [] for r in out["rows"])
    assert out["flagged"] == ["fp32 scalar arguments in a float64 kernel: clip_low"]
    assert out["fp32"] == []
