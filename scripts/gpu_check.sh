#!/usr/bin/env bash
# One GPU check: build the marlin CUDA extension, run the kernel tests, time the kernel against dense cuBLAS
# and (where given) vLLM's Marlin and Machete kernels. Logs and JSON go to $OUT (default ./out); each
# benchmark's summary table is printed last.
#
# Usage (repo root, on the GPU machine): scripts/gpu_check.sh [steps]   steps: any of build tests bench
# (default all three). MARLIN_PEERS: vLLM's _C_stable_libtorch.abi3.so (or .so.xz, or its folder, with
# scalar_type.py beside it; see scripts/bench_kernel.py); without it the peers' columns are skipped.
# BENCH_ARGS: extra bench_kernel.py arguments for both timing runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the benchmark GPU (9.0a: the wgmma kernels); "8.0;9.0a" for A100 too
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/marlin_torch_ext}
PY=${PYTHON:-python3}
STEPS=${*:-build tests bench}
rc=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/build.log"
if [[ $STEPS == *build* ]]; then
  echo "== build" | tee -a "$OUT/build.log"
  MARLIN_BUILD_VERBOSE=1 $PY -c "from gptq import kernel; assert kernel.kernel_available(), 'build failed'" \
    2>&1 | tee -a "$OUT/build.log" | grep -E "ptxas (warning|error)|error|Error|spill stores" | grep -v " 0 bytes spill" || true
fi
if ! $PY -c "from gptq import kernel; assert kernel.kernel_available()"; then
  echo "BUILD FAILED (see $OUT/build.log)"; exit 1
fi

if [[ $STEPS == *tests* ]]; then
  echo "== tests"
  $PY -m pytest -q --maxfail=40 --tb=line --noconftest -p no:cacheprovider tests/test_kernel_gpu.py tests/test_kernel_cpu.py \
    2>&1 | tee "$OUT/tests.log" | tail -n 25
  (( PIPESTATUS[0] == 0 )) || rc=1
fi

if [[ $STEPS == *bench* ]]; then
  echo "== benchmark fp16"
  # shellcheck disable=SC2086
  $PY scripts/bench_kernel.py --out "$OUT" --json bench_fp16.json --dtypes fp16 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_fp16.log"
  (( PIPESTATUS[0] == 0 )) || rc=1
  echo "== benchmark bf16"
  # shellcheck disable=SC2086
  $PY scripts/bench_kernel.py --out "$OUT" --json bench_bf16.json --dtypes bf16 --batches 1 16 128 256 1024 \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_bf16.log"
  (( PIPESTATUS[0] == 0 )) || rc=1
fi
echo "gpu_check: steps '$STEPS' rc=$rc"
exit $rc
