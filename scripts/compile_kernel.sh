#!/usr/bin/env bash
# CI: compile the pure-CUDA kernel files with plain nvcc for sm_80, sm_90 and sm_90a (the Hopper wgmma kernel;
# MARLIN_SM90A as the extension build defines it), no torch, no GPU needed.
# Prints ptxas register/spill reports per kernel (names cut to 110 characters); fails on any compile error. Skips (exit 0) when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_kernel: nvcc not found, skipping"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for src in csrc/marlin_kernel.cu csrc/marlin_wgmma.cu csrc/marlin_dequant.cu; do
  echo "== $src"
  "$NVCC" -c -std=c++17 -DMARLIN_SM90A -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
    -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
    "$src" -o "$tmp/$(basename "$src").o" 2>&1 | grep -E "error|warning|Compiling entry|registers|spill" \
    | sed -E "s/Compiling entry function '([^']{0,110})[^']*'/entry \1/" || true
  test -s "$tmp/$(basename "$src").o"
done
echo "compile_kernel: ok"
