"""The CUDA compile report (fastpo/aot/cuda_report.py) on real nvcc / cuobjdump output:
one arch, the smallest kernel file (token_logprobs.cu), well under a minute, no GPU."""
from __future__ import annotations

import pytest

from fastpo.aot import cuda_report

pytestmark = pytest.mark.skipif(
    cuda_report.nvcc_path() is None or cuda_report.cuobjdump_path() is None, reason="needs nvcc and cuobjdump"
)

KEYS = {"backend", "kernel", "variant", "arch", "dtype", "vocab", "compiled", "error", "registers", "spill_bytes",
        "shared_bytes", "threads", "load_bits", "store_bits", "instr_per_elem", "violations"}


@pytest.fixture(scope="module")
def rows():
    return cuda_report.collect([90], sources=["token_logprobs"])


def test_rows_cover_every_instantiation(rows):
    assert all(set(r) == KEYS for r in rows)
    got = {(r["kernel"], r["dtype"], r["variant"]) for r in rows}
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        assert ("token_logprobs_fwd_kernel", dtype, "") in got
        for flag in (0, 1):
            assert ("token_logprobs_bwd_kernel", dtype, f"entropy_grad={flag}") in got
    assert all(r["compiled"] and r["arch"] == 90 and r["error"] is None for r in rows)


def test_parsed_numbers_are_real(rows):
    """Registers from ptxas, the block bound from the ELF, and 128-bit vocabulary loads /
    gradient stores found in the SASS loop (issue 8, defects 9 and 11)."""
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["threads"] == 512
        assert r["load_bits"] == 128, r
        assert r["instr_per_elem"] is not None and 1 < r["instr_per_elem"] < 200
        if r["kernel"] == "token_logprobs_bwd_kernel":
            assert r["store_bits"] == 128, r
        if r["dtype"] != "fp64":
            assert r["spill_bytes"] == 0 and r["violations"] == [], r
    fwd = {r["dtype"]: r for r in rows if r["kernel"] == "token_logprobs_fwd_kernel"}
    assert fwd["fp32"]["shared_bytes"] > 0  # block_merge's shared states


def test_parsers_on_known_text():
    ptxas = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 384 bytes smem"""
    assert cuda_report.parse_ptxas(ptxas) == {"_Z1kv": {"registers": 64, "spill_bytes": 32, "shared_bytes": 384}}
    sass = [(0x10, "MOV R1, c[0x0][0x28]"), (0x20, "@!P1 LDG.E.128 R4, desc[UR6][R2.64]"),
            (0x30, "LDG.E.U16 R8, desc[UR6][R2.64]"), (0x40, "STG.E.128 desc[UR6][R2.64], R4"),
            (0x50, "@!P0 BRA 0x20"), (0x60, "EXIT")]
    (loop,) = cuda_report.parse_sass_loops(sass)
    assert loop == {"start": 0x20, "end": 0x50, "instructions": 4, "loads": [128, 16], "stores": [128]}


def test_violations_are_asserted():
    info = {"registers": 72, "spill_bytes": 8, "shared_bytes": 0}
    sass = [(0x10, "LDG.E.U16 R4, desc[UR6][R2.64]"), (0x20, "STG.E.U16 desc[UR6][R2.64], R4"),
            (0x30, "@P0 BRA 0x10")]
    row = cuda_report._row(90, "k", "void ns::token_logprobs_bwd_kernel<__half, false>(int)", info, sass, 512)
    assert row["dtype"] == "fp16" and row["load_bits"] == 16 and row["store_bits"] == 16
    text = " | ".join(row["violations"])
    assert "spills 8" in text and "blocks per SM" in text and "not 128" in text
