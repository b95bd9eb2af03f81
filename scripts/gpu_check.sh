#!/usr/bin/env bash
# One GPU check: build the marlin CUDA extension, run the GPU tests, time the kernel against dense cuBLAS and
# (where given) vLLM's Marlin and Machete kernels, and time end-to-end decoding. Logs and JSON go to $OUT
# (default ./out); each benchmark's summary table is printed last.
#
# Usage (repo root, on the GPU machine): scripts/gpu_check.sh [steps]
#   steps, any of (default: build tests more bench):
#     build       build the extension (ptxas warnings, errors and spills are printed)
#     tests       tests/test_kernel_gpu.py and tests/test_kernel_cpu.py
#     more        the other GPU tests: tests/test_fused.py (fused layers through the kernel) and
#                 tests/test_serve_gpu.py (vLLM's ops run where MARLIN_PEERS is given)
#     bench       bench-fp16 and bench-bf16: scripts/bench_kernel.py over the Llama-2 7B/70B layers
#     e2e         marlin bench --synthetic llama2-7b (decode tokens/s, fp16 vs marlin vs marlin-fused)
# MARLIN_PEERS: vLLM's _C_stable_libtorch.abi3.so (or .so.xz, or its folder, with scalar_type.py beside it;
# see scripts/bench_kernel.py); without it the peers' columns and the vLLM tests are skipped.
# BENCH_ARGS: extra bench_kernel.py arguments for both timing runs; E2E_ARGS: extra marlin bench arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the benchmark GPU (9.0a: the wgmma kernels); "8.0;9.0a" for A100 too
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/marlin_torch_ext}
PY=${PYTHON:-python3}
STEPS=" ${*:-build tests more bench} "
STEPS=${STEPS/ bench / bench-fp16 bench-bf16 }
has() { [[ $STEPS == *" $1 "* ]]; }
rc=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/build.log"
if has build; then
  echo "== build" | tee -a "$OUT/build.log"
  MARLIN_BUILD_VERBOSE=1 $PY -c "from gptq import kernel; assert kernel.kernel_available(), 'build failed'" \
    2>&1 | tee -a "$OUT/build.log" | grep -E "ptxas (warning|error)|error|Error|spill stores" | grep -v " 0 bytes spill" || true
fi
if ! $PY -c "from gptq import kernel; assert kernel.kernel_available()"; then
  echo "BUILD FAILED (see $OUT/build.log)"; exit 1
fi

if has tests; then
  echo "== tests"
  $PY -m pytest -q --maxfail=40 --tb=line --noconftest -p no:cacheprovider tests/test_kernel_gpu.py tests/test_kernel_cpu.py \
    2>&1 | tee "$OUT/tests.log" | tail -n 25
  (( PIPESTATUS[0] == 0 )) || rc=1
fi

if has more; then
  echo "== more GPU tests (fused layers, serving)"
  vllm_ops=""
  if [[ -n ${MARLIN_PEERS:-} ]]; then
    vllm_ops=$MARLIN_PEERS
    [[ -d $vllm_ops ]] && vllm_ops=$(ls "$vllm_ops"/_C_stable_libtorch.abi3.so* 2>/dev/null | head -n 1)
  fi
  MARLIN_VLLM_OPS=$vllm_ops $PY -m pytest -q -rs --maxfail=20 --tb=short -p no:cacheprovider -s \
    tests/test_fused.py -k "kernel_equals or on_gpu or negative or vllm or act_order" tests/test_serve_gpu.py \
    2>&1 | tee "$OUT/tests_more.log" | grep -E "passed|failed|error|SKIP|negative scales|vLLM|Error" | tail -n 30
  (( PIPESTATUS[0] == 0 )) || rc=1
fi

for dtype in fp16 bf16; do
  if has "bench-$dtype"; then
    echo "== benchmark $dtype"
    # shellcheck disable=SC2086
    $PY scripts/bench_kernel.py --out "$OUT" --json "bench_$dtype.json" --dtypes "$dtype" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench_$dtype.log"
    (( PIPESTATUS[0] == 0 )) || rc=1
  fi
done

if has e2e; then
  echo "== marlin bench (end to end, random Llama-2-7B)"
  # shellcheck disable=SC2086
  $PY -m marlin_cli.cli bench --synthetic llama2-7b --steps 30 --rounds 3 --json "$OUT/bench_e2e.json" \
    ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.log"
  (( PIPESTATUS[0] == 0 )) || rc=1
fi
echo "gpu_check: steps '$STEPS' rc=$rc"
exit $rc
