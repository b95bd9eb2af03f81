"""Benchmark the Marlin kernel against fp16 cuBLAS (torch.matmul) on Llama-2 linear-layer shapes.

Method: for each (shape, batch) a CUDA graph runs the op once on each of several weight copies (rotated so
one pass touches > 256 MB, far beyond the 50 MB L2); after warm-up the graph is replayed and timed with
CUDA events; the median replay time divided by the number of copies is taken, and the best of three rounds
(every path timed once per round, interleaved, the order rotated from round to round, an idle pause
before each timing) is reported. Weights are random (never zeros): any int32 word is a valid packed group
of 8 codes. fp16 cuBLAS runs in the same process.

Floor = max(bytes / bandwidth, flops / matrix rate) with the device's measured ceilings (H100: 3.0 TB/s
copy, 740 TFLOP/s fp16; H200: 4.3 TB/s, 788 TFLOP/s); bytes = packed weights + scales + activations + output.
"of floor" = floor / our time. "ours" is the op's automatic choice; the mma (up to batch 256), wgmma
(Hopper) and dense (dequantize + cuBLAS) columns force each path.

Prints a per-shape table, then the per-model sums (the acceptance numbers) LAST; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptq import kernel

MODELS = {
    "llama2-7b": ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)),
    "llama2-70b": ((8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)),
}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MMA_MAX_BATCH = 256  # the mma kernel is timed up to here (beyond, it is 2-3x slower than the others)
GROUP = 128
CEILINGS = {  # device name substring -> (copy bytes/s, fp16 matmul FLOP/s), measured
    "H100": (3.0e12, 740e12),  # the benchmark H100 (../shared/design/gpu.md)
    "H200": (4.3e12, 788e12),  # the device tool's H200 (its KINDS.md)
}
BANDWIDTH, FLOPS = CEILINGS["H100"]  # replaced in main() by the running device's entry
ROTATION_BYTES = 256 * 2**20
ROUNDS = 3


@dataclass
class Row:
    """Timings of one (shape, batch) in microseconds."""

    model: str
    k: int
    n: int
    batch: int
    fp16_us: float
    ours_us: float
    mma_us: float | None
    wgmma_us: float | None
    dense_us: float | None
    floor_us: float


def _graph_time_us(fn, copies: int, replays: int = 25, warmup: int = 3) -> float:
    """Median time per call of fn(i) for i in range(copies), captured once in a CUDA graph."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / copies)
    del graph
    return statistics.median(times)


def _floor_us(m: int, k: int, n: int) -> float:
    bytes_moved = k * n // 2 + (k // GROUP) * n * 2 + m * k * 2 + m * n * 2
    return max(bytes_moved / BANDWIDTH, 2.0 * m * k * n / FLOPS) * 1e6


def bench_shape(model: str, k: int, n: int, batches: tuple[int, ...], gen: torch.Generator) -> list[Row]:
    """Time fp16 cuBLAS and our op (auto, each fused kernel, dense) for every batch on one [k, n] weight."""
    dev = "cuda"
    q_copies = max(2, math.ceil(ROTATION_BYTES / (k * n // 2)))
    h_copies = max(2, math.ceil(ROTATION_BYTES / (k * n * 2)))
    qweights = [
        torch.randint(-(2**31), 2**31 - 1, (k // 16, 2 * n), generator=gen, device=dev, dtype=torch.int32)
        for _ in range(q_copies)
    ]
    scales = [
        (torch.rand(k // GROUP, n, generator=gen, device=dev) * 0.01 + 1e-3).half() for _ in range(q_copies)
    ]
    dense = [(torch.randn(k, n, generator=gen, device=dev) * 0.02).half() for _ in range(h_copies)]
    rows = []
    for m in batches:
        a = torch.randn(m, k, generator=gen, device=dev).half()
        paths = {"auto": kernel.PATH_AUTO}
        if m <= MMA_MAX_BATCH:
            paths["mma"] = kernel.PATH_MMA
        if kernel.wgmma_available():
            paths["wgmma"] = kernel.PATH_WGMMA
        if m >= 32:
            paths["dense"] = kernel.PATH_DENSE
        timers = {"fp16": lambda a=a: _graph_time_us(lambda i: a @ dense[i], h_copies)}
        for name, path in paths.items():
            timers[name] = lambda a=a, path=path: _graph_time_us(
                lambda i: kernel.marlin_gemm(a, qweights[i], scales[i], GROUP, path), q_copies
            )
        names = list(timers)
        best: dict[str, float] = {}
        last = 0.0
        for r in range(ROUNDS):
            # Interleaved rounds, the order rotated each round, best of the rounds, and an idle pause as
            # long as the previous timing (at most 0.2 s) before each: a timing right after a heavy one
            # (cuBLAS at full power) ran up to 20% slow on the H200 at m >= 256.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                time.sleep(min(0.2, last))
                start = time.perf_counter()
                best[name] = min(best.get(name, math.inf), timers[name]())
                last = time.perf_counter() - start
        fp16, ours, mma = best["fp16"], best["auto"], best.get("mma")
        wgmma, dense_us = best.get("wgmma"), best.get("dense")
        rows.append(Row(model, k, n, m, fp16, ours, mma, wgmma, dense_us, _floor_us(m, k, n)))
        print(
            f"{model:11s} {k:5d}x{n:<5d} b={m:<4d} fp16 {fp16:8.1f}  ours {ours:8.1f} ({fp16 / ours:5.2f}x)  "
            f"mma {_fmt(mma)}  wgmma {_fmt(wgmma)}  dense {_fmt(dense_us)}  floor {rows[-1].floor_us:6.1f}",
            flush=True,
        )
    return rows


def _fmt(us: float | None) -> str:
    return f"{us if us is not None else float('nan'):8.1f}"


def _total(rows: list[Row], field: str) -> float:
    values = [getattr(r, field) for r in rows]
    return float("nan") if any(v is None for v in values) else sum(values)


def summary_table(rows: list[Row], device: str) -> str:
    """Per-model sums over the four layers, one line per batch."""
    lines = [
        f"device: {device}   (g{GROUP}, CUDA graphs, weights rotated > 256 MB; times are sums over 4 layers)",
        f"{'shape':11s} {'batch':>5s} {'fp16 us':>9s} {'ours us':>9s} {'ratio':>6s} {'of floor':>8s} "
        f"{'mma us':>9s} {'wgmma us':>9s} {'dense us':>9s}",
    ]
    for model in MODELS:
        for m in sorted({r.batch for r in rows if r.model == model}):
            sel = [r for r in rows if r.model == model and r.batch == m]
            fp16, ours = sum(r.fp16_us for r in sel), sum(r.ours_us for r in sel)
            floor = sum(r.floor_us for r in sel)
            lines.append(
                f"{model:11s} {m:5d} {fp16:9.1f} {ours:9.1f} {fp16 / ours:5.2f}x {floor / ours:8.2f} "
                f"{_total(sel, 'mma_us'):9.1f} {_total(sel, 'wgmma_us'):9.1f} {_total(sel, 'dense_us'):9.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench.json (default $OUT)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    args = parser.parse_args()
    if not kernel.kernel_available():
        raise SystemExit("the marlin CUDA kernel is not available (no GPU or the build failed)")
    device = torch.cuda.get_device_name()
    global BANDWIDTH, FLOPS
    known = [v for key, v in CEILINGS.items() if key in device]
    if known:
        BANDWIDTH, FLOPS = known[0]
    else:
        print(f"no measured ceilings for {device}; the floor uses the H100's")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model in args.models:
        for k, n in MODELS[model]:
            rows.extend(bench_shape(model, k, n, tuple(args.batches), gen))
            torch.cuda.empty_cache()
    table = summary_table(rows, device)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        payload = {
            "device": device,
            "group_size": GROUP,
            "ceilings": {"bytes_per_s": BANDWIDTH, "flop_per_s": FLOPS},
            "rows": [asdict(r) for r in rows],
            "summary": table,
        }
        (Path(args.out) / "bench.json").write_text(json.dumps(payload, indent=1))
    print(table)


if __name__ == "__main__":
    main()
