"""Benchmark: the 4-bit loss each quantization method leaves on the built-in model, and its time.

For each group size, the unquantized model and each ``--method`` (rtn, gptq, fast, best) quantized with the
same calibration data (64 Python-doc documents of <= 512 tokens, seed 0) are evaluated in float32 on the
whole botchan stream (1024-token windows) and on the 64 held-out Python documents (document protocol). Each
row prints the perplexities, their ratio to the unquantized model and the quantization time.

Baseline: AutoRound 0.16.1 (Intel's auto-round; Cheng et al., 2023), measured on the same kind of 2-core CPU
with the same calibration documents at group 64, symmetric int4, as issue 18 of this project reports it
(``iters=0``: its importance-matrix "optimized RTN"; 200 iterations: its SignRound tuning), and the original
Marlin GPTQ with group grid clipping. Those held-out documents are another draw than ours: compare the ratios.
They print as reference rows at group 64.

    python scripts/bench_quality.py [--group-sizes 64 128 -1] [--methods rtn gptq fast best]
                                    [--max-windows 0] [--max-docs 0] [--out DIR] [--json out.json]

``--max-windows/--max-docs`` bound the evaluation (0: all, the default). Group 128 is written in the Marlin
layout (the built-in model's K = 576 is not a multiple of 128: the layout pads the last group).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

from marlin_cli.eval.ppl import measure
from marlin_cli.loading import load_model
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.report import render_table, write_json
from marlin_cli.runtime import device_description, versions
from marlin_cli.settings import METHODS, QuantSettings

MODEL = "smollm2-135m"
DATASETS = (("botchan", "max_windows"), ("pydocs", "max_docs"))
SEQLEN = 1024

REFERENCE_G64 = [
    # (method, botchan ppl, botchan ratio, held-out ratio, seconds), issue 18's table (2-core CPU, g64)
    ("fp16 (reference run)", 32.07, 1.0, 1.0, None),
    ("AutoRound iters=0", 37.61, 1.173, 1.192, 72.0),
    ("AutoRound 200 iters", 36.38, 1.134, 1.053, 1076.0),
    ("original GPTQ + clipping", 39.92, 1.245, 1.202, 268.0),
]


def evaluate(path: str, bounds: dict[str, int | None]) -> dict[str, float]:
    """Perplexity of the model at ``path`` on each dataset (float32, CPU)."""
    loaded = load_model(path, device="cpu", dtype=torch.float32)
    out = {}
    for name, key in DATASETS:
        result, _ = measure(loaded.model, loaded.tokenizer, name, SEQLEN, seed=0, progress=False,
                            **{key: bounds[key]})
        out[name] = result.ppl
    del loaded
    gc.collect()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128, -1])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "fast", "best"], choices=list(METHODS))
    parser.add_argument("--max-windows", type=int, default=0, help="botchan windows (0: all 68)")
    parser.add_argument("--max-docs", type=int, default=0, help="held-out documents (0: all 64)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    bounds = {"max_windows": args.max_windows or None, "max_docs": args.max_docs or None}
    root = args.out or Path(tempfile.mkdtemp(prefix="marlin-quality-"))
    print(f"device: {device_description('cpu')}; evaluation: botchan {args.max_windows or 'all'} windows, "
          f"{args.max_docs or 'all 64'} held-out pydocs", file=sys.stderr, flush=True)
    fp = evaluate(MODEL, bounds)
    print(f"fp16: {fp}", file=sys.stderr, flush=True)
    rows, records = [], []
    for g in args.group_sizes:
        for method in args.methods:
            settings = QuantSettings(group_size=g, method=method, format="marlin")
            folder = root / f"g{g}" / method
            result = quantize(QuantizeJob(model=MODEL, out=folder, settings=settings, force=True), progress=False)
            seconds = result.record["quantize_seconds"]
            ppl = evaluate(str(folder), bounds)
            ratio = {k: v / fp[k] for k, v in ppl.items()}
            print(f"g{g} {method}: {ppl} ratios {ratio} in {seconds:.0f} s", file=sys.stderr, flush=True)
            rows.append([f"g{g}" if g != -1 else "per channel", method, ppl["botchan"], ratio["botchan"],
                         ppl["pydocs"], ratio["pydocs"], seconds])
            records.append({"group_size": g, "method": method, "ppl": ppl, "ratio_to_fp16": ratio,
                            "quantize_seconds": seconds, "settings": result.record})
    headers = ["group", "method", "botchan", "ratio", "held-out docs", "ratio", "seconds"]
    print(f"\nBuilt-in model ({MODEL}), {device_description('cpu')}; fp16 botchan {fp['botchan']:.2f}, held-out "
          f"docs {fp['pydocs']:.2f}")
    print(render_table(headers, rows, digits=3))
    if 64 in args.group_sizes:
        print("\nReference at g64 (issue 18's measurements on the same kind of CPU; other held-out documents: "
              "compare ratios):")
        print(render_table(["method", "botchan", "ratio", "held-out ratio", "seconds"],
                           [list(r) for r in REFERENCE_G64], digits=3))
    if args.json:
        write_json(args.json, {"fp16": fp, "rows": records, "reference_g64": REFERENCE_G64, "bounds": bounds,
                               "device": device_description("cpu"), "versions": versions()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
