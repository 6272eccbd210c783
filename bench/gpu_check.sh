#!/usr/bin/env bash
# GPU evidence (DESIGN.md §6). Run on a machine with a CUDA GPU, from the repo root:
#   OUT=/some/dir bash bench/gpu_check.sh
# Builds fastpo in place (CUDA module included), runs the test suite on the GPU,
# `fastpo verify`, `fastpo aot` (compile report, compared with the CPU-built one in
# bench/results/aot/), and `fastpo bench` at N=16384 with V=128256 and V=151936 in bf16.
# Everything it produces lands in $OUT (at most 8 files); commit them under
# bench/results/<device>/ and cite them in the README.
# The GPU machine has no network: optional wheels (rich, pytest-benchmark, hypothesis)
# may be carried in .gpu_wheels/ (git-ignored) and are installed from there.
set -uo pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .gpu_wheels ]; then
    pip install -q --no-index --find-links .gpu_wheels rich pytest-benchmark hypothesis 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
FASTPO_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { echo "build failed: see build.log"; tail -40 "$OUT/build.log"; }
python -m pytest tests -q -x 2>&1 | tee "$OUT/tests.log" | tail -15
fastpo verify --json "$OUT/verify.json" > "$OUT/verify.log" 2>&1; echo "verify exit $?"; tail -3 "$OUT/verify.log"
fastpo aot --arch 80,90 --json "$OUT/aot.json" 2>&1 | tail -4; echo "aot exit ${PIPESTATUS[0]}"
fastpo bench --json "$OUT/bench.json" \
    --shapes 16384x128256xbfloat16,16384x151936xbfloat16,16384x128256xfloat32 2>&1 | tee "$OUT/bench.log" | tail -40
