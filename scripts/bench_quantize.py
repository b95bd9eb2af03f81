"""Benchmark: quantization time per decoder layer and peak memory of `marlin quantize` on the built-in model.

Baseline: the original Marlin GPTQ (the gptq/ code of github.com/IST-DASLab/marlin) timed on the same 2-core CPU
with the same calibration budget (64 Python-doc documents x 512 tokens, g64, damping 0.1): 268 s with group grid
clipping, 173 s without (the measurement README.md's "Quantization speed and memory" table compares against).

    python scripts/bench_quantize.py [--no-clip] [--group-size 64] [--method gptq|fast|best] [--json out.json]

With ``--synthetic llama2-7b|llama2-70b`` it benchmarks a random-weight model of real dimensions instead
(s/layer, peak GPU memory by torch and nvidia-smi, peak RSS, the whole model's time extrapolated; see
:mod:`marlin_cli.pipeline.bench` and docs/scale.md):

    python scripts/bench_quantize.py --synthetic llama2-70b --layers 2 --device cuda --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings

ORIGINAL_SECONDS = {True: 268.0, False: 173.0}  # clip -> seconds, original GPTQ on this CPU (see the docstring)


def main() -> None:
    if "--synthetic" in sys.argv[1:]:
        from marlin_cli.pipeline.bench import main as synthetic_main

        synthetic_main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--no-clip", action="store_true")
    parser.add_argument("--method", default="gptq", choices=["gptq", "fast", "best"],
                        help="default gptq: the like-for-like comparison with the original's GPTQ")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    clip = not args.no_clip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = quantize(QuantizeJob(model="smollm2-135m", out=Path(tmp) / "ckpt",
                                   settings=QuantSettings(group_size=args.group_size, clip=clip, method=args.method)),
                       progress=True)
        wall = time.perf_counter() - t0
    per_layer: dict[str, float] = defaultdict(float)
    for r in res.reports:
        per_layer[r.name.split(".self_attn")[0].split(".mlp")[0]] += r.seconds
    solver_s = sum(per_layer.values())
    quant_s = res.record["quantize_seconds"]
    base = ORIGINAL_SECONDS[clip]
    print(f"\ncpu threads: {torch.get_num_threads()}  cores: {os.cpu_count()}  torch {torch.__version__}")
    print(f"{'what':<44}{'ours':>10}{'original':>10}{'ratio':>8}")
    print(f"{'quantize time, s (calibration + 30 layers)':<44}{quant_s:>10.1f}{base:>10.1f}{base / quant_s:>7.2f}x")
    print(f"{'  of which GPTQ solver, s':<44}{solver_s:>10.1f}")
    print(f"{'  per decoder layer (mean), s':<44}{quant_s / len(per_layer):>10.2f}{base / len(per_layer):>10.2f}")
    print(f"{'total with checkpoint write, s':<44}{wall:>10.1f}")
    print(f"{'peak resident memory, MB':<44}{res.peak_rss_mb:>10.0f}")
    print(f"{'checkpoint size, MB':<44}{res.checkpoint_mb:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"quantize_seconds": quant_s, "solver_seconds": solver_s, "wall_seconds": wall,
                                         "per_layer_solver_seconds": per_layer, "peak_rss_mb": res.peak_rss_mb,
                                         "original_seconds": base, "clip": clip, "group_size": args.group_size},
                                        indent=2))


if __name__ == "__main__":
    main()
