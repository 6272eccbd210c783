#!/usr/bin/env bash
# GPU evidence (DESIGN.md §6). Run on a machine with a CUDA GPU, from the repo root:
#   OUT=/some/dir bash bench/gpu_check.sh
# Sized for one device call of <= 600 s that leaves time for a rerun: each step has its own
# timeout, in order of value (about 420 s in all):
#   build (CUDA module included)                          <= 180 s
#   fastpo verify (every backend on the GPU)               <=  60 s
#   fastpo bench --ops linear at N=16384, V=128256, bf16   <= 120 s  (issue 10's GPU target:
#       H=4096 on CUDA; time vs torch's own 3 GEMMs, peak extra memory)
#   GPU tests of the compiled Triton / CUDA paths          <=  60 s
# FULL=1 adds the other ops' bench, the whole test suite and `fastpo aot` (a second call, with
# another OUT: together they exceed 8 files).
# Everything lands in $OUT (at most 8 files); commit them under bench/results/<device>/ and
# cite them in the README. SHAPES overrides the linear bench shape (N x V x dtype). The GPU
# machine has no network, so the build runs without isolation and needs pybind11 there: carry
# its wheel (and optional rich, pytest-benchmark, hypothesis) in .gpu_wheels/ (git-ignored).
set -uo pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS LOG COMMAND...: run with a timeout, tee to $OUT/LOG, report the exit
    local limit=$1 log=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$log" 2>&1
    local rc=$? note=""
    [ "$rc" = 124 ] && note=", TIMED OUT"
    echo "== $* : exit $rc ($((SECONDS - t0)) s$note)"
    tail -6 "$OUT/$log"
}
if [ -d .gpu_wheels ]; then
    pip install -q --no-index --find-links .gpu_wheels pybind11 rich pytest-benchmark hypothesis 2>&1 | tail -2
fi
python -c "import pybind11" 2>/dev/null || echo "pybind11 is not installed: the build below will fail (carry its wheel in .gpu_wheels/)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt"
cat "$OUT/device.txt"
step 180 build.log env FASTPO_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .
step 60 verify.log fastpo verify --json "$OUT/verify.json"
step 120 bench.log fastpo bench --ops linear --json "$OUT/bench.json" --shapes "${SHAPES:-16384x128256xbfloat16}"
step 60 tests.log python -m pytest tests -q -x -k "cuda or triton" -m "not slow" \
    --ignore=tests/test_integrations_trl_trainers.py --ignore=tests/test_integrations_trl_grpo.py
if [ "${FULL:-0}" = 1 ]; then
    step 300 bench_all.log fastpo bench --json "$OUT/bench_all.json" \
        --shapes 16384x128256xbfloat16,16384x151936xbfloat16
    step 400 tests_all.log python -m pytest tests -q
    step 120 aot.log fastpo aot --arch 80,90 --json "$OUT/aot.json"
fi
