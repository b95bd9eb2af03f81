"""Benchmark of ``marlin quantize`` on random-weight models of real dimensions (see :mod:`.synthetic`).

Each measured run is a child process (so its peak RSS and GPU memory are its own), optionally with another
source tree first on PYTHONPATH (``--baseline-src``: an older commit's checkout, to time before/after in one
go). The parent polls ``nvidia-smi`` for the device's used memory meanwhile. Reported per run: seconds per
decoder layer (the mean of the run record's per-layer times when it has them, else quantize time / layers),
the calibration capture, peak GPU memory (torch's max_memory_allocated and nvidia-smi's), peak RSS, and the
whole model's time extrapolated to its real depth (32 layers for 7B, 80 for 70B).

    python -m marlin_cli.pipeline.bench --synthetic llama2-70b --layers 2 --device cuda --nsamples 128 \\
        --seqlen 2048 [--baseline-src DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEPTH = {"llama2-7b": 32, "llama2-70b": 80, "tiny": 2, "small": 2}
"""Real depth of each preset, for the whole-model extrapolation."""

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
res = quantize(QuantizeJob(a["model"], Path(a["out"]), QuantSettings(**a["settings"])), progress=False)
wall = time.perf_counter() - t0
rec = res.record
cuda = torch.cuda.is_available() and a["settings"]["device"].startswith("cuda")
print("RESULT " + json.dumps({
    "wall_seconds": wall, "quantize_seconds": rec["quantize_seconds"], "layer_seconds": rec.get("layer_seconds"),
    "peak_gpu_mb": torch.cuda.max_memory_allocated() / 1e6 if cuda else 0.0,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    "device_name": torch.cuda.get_device_name() if cuda else "cpu", "spilled_batches": rec.get("spilled_batches"),
    "checkpoint_mb": res.checkpoint_mb}), flush=True)
"""


class _SmiPoller(threading.Thread):
    """Max of nvidia-smi's memory.used (MiB) of GPU 0 while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = threading.Event()
        self.ok = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.ok and not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self.stop.wait(0.25)


def measure(model: Path, settings: dict, layers: int, depth: int, baseline_src: str | None = None,
            label: str = "") -> dict:
    """One child-process run of ``quantize`` on ``model``; the row of the table (see the module docstring)."""
    env = dict(os.environ)
    if baseline_src:
        env["PYTHONPATH"] = os.pathsep.join([baseline_src, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        poller = _SmiPoller()
        poller.start()
        arg = json.dumps({"model": str(model), "out": str(Path(tmp) / "ckpt"), "settings": settings})
        # cwd outside any source tree: ``python -c`` puts the cwd first on sys.path
        proc = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, capture_output=True, text=True, cwd=tmp)
        poller.stop.set()
        poller.join()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"label": label, "error": (proc.stderr or proc.stdout)[-3000:]}
    r = json.loads(line[len("RESULT "):])
    timed = [t for t in (r.get("layer_seconds") or []) if not t.get("replayed")]
    per_layer = sum(t["total"] for t in timed) / len(timed) if timed else r["quantize_seconds"] / layers
    overhead = r["quantize_seconds"] - per_layer * layers  # calibration capture, stem, writing the rest
    r.update(label=label, layers=layers, s_per_layer=per_layer, overhead_seconds=overhead,
             whole_model_minutes=(overhead + per_layer * depth) / 60, smi_peak_mb=poller.peak)
    return r


def table(rows: list[dict]) -> str:
    """The results as a Markdown table (GB = 10^9 bytes; nvidia-smi reports MiB, converted)."""
    head = ("| run | device | layers | s / layer | overhead s | peak GPU (torch) GB | peak GPU (nvidia-smi) GB | "
            "peak RSS GB | whole model, min |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'].splitlines()[-1][:120] if r['error'] else '?'} |")
            continue
        lines.append(f"| {r['label']} | {r['device_name']} | {r['layers']} | {r['s_per_layer']:.2f} | "
                     f"{r['overhead_seconds']:.1f} | {r['peak_gpu_mb'] / 1e3:.1f} | {r['smi_peak_mb'] * 2**20 / 1e9:.1f} | "
                     f"{r['peak_rss_mb'] / 1e3:.1f} | {r['whole_model_minutes']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    from marlin_cli.data.assets import builtin_model_dir
    from marlin_cli.pipeline.synthetic import PRESETS, build_synthetic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", choices=list(PRESETS), required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["gptq"], help="quantization methods to time (--method)")
    p.add_argument("--baseline-src", default=None, help="also time this source tree (an older checkout)")
    p.add_argument("--baseline-layers", type=int, default=None, help="layers for the baseline run (default --layers)")
    p.add_argument("--model-dir", type=Path, default=None, help="build the model here (kept); default: a temp folder")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    settings = {"dataset": "botchan", "nsamples": args.nsamples, "seqlen": args.seqlen,
                "group_size": args.group_size, "format": "marlin", "device": args.device}
    depth = DEPTH.get(args.synthetic, args.layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = build_synthetic(args.model_dir or Path(tmp) / "model", args.synthetic, args.layers,
                                builtin_model_dir(), device="cuda" if args.device.startswith("cuda") else "cpu")
        print(f"built {args.synthetic} x {args.layers} layers in {time.perf_counter() - t0:.1f} s", flush=True)
        name = f"{args.synthetic} {args.nsamples}x{args.seqlen}"
        for method in args.methods:
            rows.append(measure(model, {**settings, "method": method}, args.layers, depth,
                                label=f"{name} {method} (this tree)"))
            print(table(rows), flush=True)
        if args.baseline_src:
            n = args.baseline_layers or args.layers
            if n != args.layers:
                shutil.rmtree(model) if args.model_dir is None else None
                model = build_synthetic(Path(tmp) / "model_b", args.synthetic, n, builtin_model_dir(),
                                        device="cuda" if args.device.startswith("cuda") else "cpu")
            rows.append(measure(model, settings, n, depth, args.baseline_src, label=f"{name} gptq (baseline)"))
    print(table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
