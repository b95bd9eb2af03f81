#!/usr/bin/env bash
# A/B timing of kernel versions inside one run: the working tree and other source trees, each built into its own
# extension folder (in parallel), then timed one after the other with the same scripts/bench_kernel.py arguments,
# so that a step's gain is measured on one GPU in one lease (lease-to-lease spread is a few percent).
#
# On the development machine, make the other trees (copies of csrc gptq scripts marlin_cli; the GPU machine's
# copy of the repository may not have the newer commits):
#   scripts/ab_kernel.sh prepare DIR REV [REV ...]      # DIR/<rev>/ from git archive; DIR should be git-ignored
#   (then edit a copy by hand for a variant that is no commit; an ARGS file in a tree gives it its own arguments)
# On the GPU machine (carry DIR):
#   scripts/ab_kernel.sh run "<bench_kernel.py arguments>" DIR/<name> [DIR/<name> ...]
# prints each tree's summary table (sums per model, and the forced paths asked for), then every layer's time per
# tree against the working tree's (scripts/ab_compare.py), and leaves the logs and JSON in $OUT/ab.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
mode=$1; shift
case $mode in
  prepare)
    dir=$1; shift
    [[ $# -ge 1 ]] || usage
    for rev in "$@"; do
      git rev-parse --verify -q "$rev^{commit}" >/dev/null || { echo "ab_kernel: no commit '$rev'" >&2; exit 2; }
      dest=$dir/$rev
      [[ -e $dest ]] && { echo "ab_kernel: $dest exists; remove it first" >&2; exit 2; }
      mkdir -p "$dest" && git archive "$rev" csrc gptq scripts marlin_cli | tar -x -C "$dest"
      echo "$dest"
    done
    ;;
  run)
    args=$1; shift
    [[ $# -ge 1 ]] || usage
    OUT=${OUT:-$PWD/out}
    export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-4}
    logs=$OUT/ab
    mkdir -p "$logs"
    trees=("$PWD")
    for t in "$@"; do trees+=("$(cd "$t" 2>/dev/null && pwd || echo "$t")"); done  # absolute: each run cds into it
    name() { if [[ $1 == "$PWD" ]]; then echo main; else basename "$1"; fi; }
    for t in "${trees[@]}"; do
      [[ -d $t/csrc && -d $t/gptq ]] || { echo "ab_kernel: $t is no source tree (csrc/, gptq/)" >&2; exit 2; }
    done
    t0=$(date +%s)
    for t in "${trees[@]}"; do
      n=$(name "$t")
      (cd "$t" && TORCH_EXTENSIONS_DIR=/tmp/ab_ext_$n PYTHONPATH=$t python3 -c \
        "from gptq import kernel; assert kernel.kernel_available()" >"$logs/build_$n.log" 2>&1 \
        || echo "ab_kernel: $n did not build (see build_$n.log)") &
    done
    wait
    echo "built in $(($(date +%s) - t0)) s"
    for t in "${trees[@]}"; do
      n=$(name "$t")
      a=$args
      [[ -f $t/ARGS ]] && a=$(cat "$t/ARGS")
      echo "== $n ($a)"
      # shellcheck disable=SC2086
      (cd "$t" && TORCH_EXTENSIONS_DIR=/tmp/ab_ext_$n PYTHONPATH=$t python3 scripts/bench_kernel.py --out "$logs" \
        --json "ab_$n.json" $a >"$logs/ab_$n.log" 2>&1)
      grep -A40 "^dtype shape" "$logs/ab_$n.log" || tail -n 5 "$logs/ab_$n.log"
    done
    [[ ${#trees[@]} -ge 2 ]] && python3 scripts/ab_compare.py "$logs" --json "$logs/compare.json"
    tar czf "$OUT/ab.tgz" -C "$OUT" ab && rm -rf "$logs"
    ;;
  *) usage ;;
esac
