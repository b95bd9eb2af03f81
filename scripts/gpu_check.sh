#!/usr/bin/env bash
# One GPU check: build the marlin CUDA extension, run the kernel tests, benchmark against fp16 cuBLAS.
# Logs and bench.json go to $OUT (default ./out); the benchmark's summary table is printed last.
# Usage (repo root, on the GPU machine): scripts/gpu_check.sh [extra bench_kernel.py args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the benchmark GPU (9.0a: the wgmma kernel); "8.0;9.0a" for A100 too
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/marlin_torch_ext}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/build.log"
echo "== build" | tee -a "$OUT/build.log"
MARLIN_BUILD_VERBOSE=1 $PY -c "from gptq import kernel; assert kernel.kernel_available(), 'build failed'" \
  2>&1 | tee -a "$OUT/build.log" | grep -E "ptxas|error|Error|warning" || true
if ! $PY -c "from gptq import kernel; assert kernel.kernel_available()"; then
  echo "BUILD FAILED (see $OUT/build.log)"; exit 1
fi

echo "== tests"
$PY -m pytest -q --maxfail=40 --tb=line --noconftest -p no:cacheprovider tests/test_kernel_gpu.py tests/test_kernel_cpu.py \
  2>&1 | tee "$OUT/tests.log" | tail -n 25
test_rc=${PIPESTATUS[0]}

echo "== benchmark"
$PY scripts/bench_kernel.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
