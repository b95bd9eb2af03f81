"""Benchmark the Marlin kernel against dense cuBLAS and, where given, vLLM's Marlin and Machete kernels.

Shapes: the four linear layers of Llama-2 7B and 70B (k x n), group size 128, fp16 and/or bf16.

Method: for each (shape, batch) a CUDA graph runs the op once on each of several weight copies (rotated so
one pass touches > 256 MB, far beyond the 50 MB L2); after warm-up the graph is replayed and timed with
CUDA events; the median replay time divided by the number of copies is taken, and the best of three rounds
(every kernel timed once per round, interleaved, the order rotated from round to round, an idle pause
before each timing) is reported. Weights are random (never zeros): any int32 word is a valid packed group
of 8 codes. Every kernel runs in the same process on the same GPU.

Columns: "cublas" is the dense product (torch.matmul) in the activation dtype, the baseline of every ratio
(ratio = cublas time / kernel time); "ours" is ``gptq.kernel.marlin_gemm``'s automatic choice; --paths adds
our forced paths (mma, wgmma, dense); "vllm_marlin" and "machete" are vLLM's ``marlin_gemm`` (its
GPTQ-Marlin kernel) and ``machete_mm`` (its Hopper mixed-input CUTLASS kernel), loaded from the
``_C_stable_libtorch.abi3.so`` of vLLM's PyPI wheel (stable libtorch ABI: it loads into this torch with
``torch.ops.load_library``) given by --peers or $MARLIN_PEERS (the .so, or the same compressed with xz;
``scalar_type.py`` of the same wheel beside it). Without it the peers are skipped, and said so. Before
timing, each peer's output is compared with a float64 reference on our packed weights (vLLM's Marlin reads
the same layout; Machete gets the codes repacked its way), and the errors are printed and saved.

Floor = max(bytes / bandwidth, flops / matrix rate) with the device's measured ceilings (H100: 3.0 TB/s
copy, 740 TFLOP/s fp16; H200: 4.3 TB/s, 788 TFLOP/s); bytes = packed weights + scales + activations + output.
"of floor" = floor / our time.

Prints a per-shape line as it goes, then the per-model sums (the acceptance numbers) LAST, with the device
name; writes JSON (--json, default bench.json) to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from gptq import format as fmt
from gptq import kernel

MODELS = {
    "llama2-7b": ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)),
    "llama2-70b": ((8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)),
}
BATCHES = (1, 8, 16, 32, 64, 128, 256, 512, 1024)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MMA_MAX_BATCH = 256  # a forced mma path is timed up to here (beyond, it is 2-3x slower than the others)
GROUP = 128
CEILINGS = {  # device name substring -> (copy bytes/s, fp16 matmul FLOP/s), measured on the device tool's machines
    "H100": (3.0e12, 740e12),
    "H200": (4.3e12, 788e12),
}
ROTATION_BYTES = 256 * 2**20
ROUNDS = 3
PEER_NAMES = ("vllm_marlin", "machete")


@dataclass
class Row:
    """Timings of one (dtype, shape, batch) in microseconds (NaN: the kernel failed on it)."""

    model: str
    dtype: str
    k: int
    n: int
    batch: int
    cublas_us: float
    ours_us: float
    floor_us: float
    paths_us: dict[str, float] = field(default_factory=dict)
    peers_us: dict[str, float] = field(default_factory=dict)


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


def _floor_us(m: int, k: int, n: int, bandwidth: float, flops: float) -> float:
    bytes_moved = k * n // 2 + (k // GROUP) * n * 2 + m * k * 2 + m * n * 2
    return max(bytes_moved / bandwidth, 2.0 * m * k * n / flops) * 1e6


class Peers:
    """vLLM's marlin_gemm and machete_mm from its wheel's extension, called by argument name (so that a
    schema that gained or lost an optional argument between vLLM versions still binds)."""

    def __init__(self, so_path: Path) -> None:
        scalar_type = so_path.parent / "scalar_type.py"
        if so_path.suffix == ".xz":
            plain = Path(tempfile.gettempdir()) / so_path.stem
            if not plain.exists():
                with lzma.open(so_path) as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            so_path = plain
        torch.ops.load_library(str(so_path))
        self.marlin_op = torch.ops._C.marlin_gemm.default
        self.machete_op = torch.ops._C.machete_mm.default
        self.prepack_op = torch.ops._C.machete_prepack_B.default
        self.u4b8 = _load_module(scalar_type).scalar_types.uint4b8.id
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count

    @staticmethod
    def _call(op, **named):
        args = [named.get(arg.name) for arg in op._schema.arguments]
        return op(*args)

    def workspace(self) -> torch.Tensor:
        return torch.zeros(self.sms * 4, dtype=torch.int32, device="cuda")

    def marlin(self, a, qweight, scales, workspace, n, k):
        """vLLM's GPTQ-Marlin product on our packed weights (the original Marlin layout, uint4b8 codes)."""
        return self._call(
            self.marlin_op,
            a=a,
            b_q_weight=qweight,
            b_scales=scales,
            workspace=workspace,
            b_type_id=self.u4b8,
            size_m=a.shape[0],
            size_n=n,
            size_k=k,
            use_atomic_add=False,
            use_fp32_reduce=True,
            is_zp_float=False,
        )

    def prepack(self, gptq_qweight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Machete's layout from GPTQ-packed codes int32 [k/8, n] (8 codes along k per word)."""
        return self._call(
            self.prepack_op,
            B=gptq_qweight.t().contiguous().t(),
            a_type=dtype,
            b_type=self.u4b8,
            group_scales_type=dtype,
        )

    def machete_gptq(self, a, gptq_qweight, natural_scales, dtype):
        return self.machete(a, self.prepack(gptq_qweight, dtype), natural_scales)

    def machete(self, a, packed, natural_scales):
        return self._call(
            self.machete_op, A=a, B=packed, b_type=self.u4b8, group_scales=natural_scales, group_size=GROUP
        )


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_scalar_type", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_peers(path: str | None) -> tuple[Peers | None, str]:
    """(Peers, "") or (None, why they are skipped)."""
    if not path:
        return None, "no --peers / $MARLIN_PEERS given"
    so = Path(path)
    if so.is_dir():
        found = sorted(so.glob("_C_stable_libtorch.abi3.so*"))
        if not found:
            return None, f"no _C_stable_libtorch.abi3.so[.xz] in {so}"
        so = found[0]
    if not so.exists():
        return None, f"{so} does not exist"
    try:
        return Peers(so), ""
    except Exception as err:  # a wheel built for another CUDA or torch, a missing scalar_type.py, ...
        return None, f"could not load {so}: {err!r}"[:300]


def check_peers(peers: Peers, dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    """Relative error of ours and each peer against a float64 reference, on two layers at m = 16."""
    checks = []
    for k, n in ((4096, 4096), (11008, 4096)):
        codes = torch.randint(0, 16, (k, n), device="cuda", generator=gen)
        scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.01 + 1e-3).to(dtype)
        qweight, packed_scales, _ = fmt.pack(codes, scales, GROUP)
        a = torch.randn(16, k, device="cuda", generator=gen).to(dtype)
        ref = a.double() @ ((codes - 8).double() * scales.double().repeat_interleave(GROUP, 0))
        shifts = (4 * torch.arange(8, device="cuda")).view(1, 8, 1)
        words = (codes.reshape(k // 8, 8, n).to(torch.int64) << shifts).sum(1)
        gptq_qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        row: dict = {"dtype": str(dtype), "k": k, "n": n}
        for name, fn, fn_args in (
            ("ours", kernel.marlin_gemm, (a, qweight, packed_scales, GROUP)),
            ("vllm_marlin", peers.marlin, (a, qweight, packed_scales, peers.workspace(), n, k)),
            ("machete", peers.machete_gptq, (a, gptq_qweight, scales, dtype)),
        ):
            try:
                row[name] = float((fn(*fn_args).double() - ref).norm() / ref.norm())
            except Exception as err:
                row[name] = f"failed: {err!r}"[:200]
        checks.append(row)
        print("check vs float64:", row, flush=True)
    return checks


def bench_shape(
    model: str, k: int, n: int, dtype_name: str, args, peers: Peers | None, ceilings, gen: torch.Generator
) -> list[Row]:
    """Time cuBLAS, our op and the peers for every batch on one [k, n] weight."""
    dtype = DTYPES[dtype_name]
    q_copies = max(2, math.ceil(ROTATION_BYTES / (k * n // 2)))
    h_copies = max(2, math.ceil(ROTATION_BYTES / (k * n * 2)))
    qweights = [
        torch.randint(-(2**31), 2**31 - 1, (k // 16, 2 * n), generator=gen, device="cuda", dtype=torch.int32)
        for _ in range(q_copies)
    ]
    scales = [
        (torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.01 + 1e-3).to(dtype)
        for _ in range(q_copies)
    ]
    dense = [(torch.randn(k, n, generator=gen, device="cuda") * 0.02).to(dtype) for _ in range(h_copies)]
    workspaces, machete_b = [], []
    if peers is not None:
        workspaces = [peers.workspace() for _ in range(q_copies)]
        try:
            for _ in range(q_copies):
                codes = torch.randint(
                    -(2**31), 2**31 - 1, (k // 8, n), generator=gen, device="cuda", dtype=torch.int32
                )
                machete_b.append(peers.prepack(codes, dtype))
        except Exception as err:
            machete_b = []
            print(f"machete_prepack_B failed at {k}x{n}: {err!r}"[:300], flush=True)
    forced = {"mma": kernel.PATH_MMA, "wgmma": kernel.PATH_WGMMA, "dense": kernel.PATH_DENSE}
    rows = []
    for m in args.batches:
        a = torch.randn(m, k, generator=gen, device="cuda").to(dtype)

        def ours(path: int, a=a):
            return lambda: _graph_time_us(
                lambda i: kernel.marlin_gemm(a, qweights[i], scales[i], GROUP, path), q_copies
            )

        timers = {"cublas": lambda a=a: _graph_time_us(lambda i: a @ dense[i], h_copies), "ours": ours(0)}
        for name in args.paths:
            if name == "mma" and m > MMA_MAX_BATCH or name == "wgmma" and not kernel.wgmma_available():
                continue
            timers[name] = ours(forced[name])
        if peers is not None:
            timers["vllm_marlin"] = lambda a=a, m=m: _graph_time_us(
                lambda i: peers.marlin(a, qweights[i], scales[i], workspaces[i], n, k), q_copies
            )
        if machete_b:
            timers["machete"] = lambda a=a: _graph_time_us(
                lambda i: peers.machete(a, machete_b[i], scales[i]), q_copies
            )
        names = list(timers)
        best: dict[str, float] = {}
        last = 0.0
        for r in range(args.rounds):
            # Interleaved rounds, the order rotated each round, best of the rounds, and an idle pause as long
            # as the previous timing (at most 0.2 s) before each: a timing right after a heavy one (cuBLAS at
            # full power) ran up to 20% slow on the H200 at m >= 256.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                time.sleep(min(0.2, last))
                start = time.perf_counter()
                try:
                    best[name] = min(best.get(name, math.inf), timers[name]())
                except Exception as err:  # a peer that refuses a shape must not stop the table
                    best[name] = math.nan
                    print(f"{name} failed at {k}x{n} m={m}: {err!r}"[:300], flush=True)
                last = time.perf_counter() - start
        row = Row(
            model,
            dtype_name,
            k,
            n,
            m,
            best["cublas"],
            best["ours"],
            _floor_us(m, k, n, *ceilings),
            {p: best[p] for p in args.paths if p in best},
            {p: best[p] for p in PEER_NAMES if p in best},
        )
        rows.append(row)
        extra = "  ".join(f"{p} {t:8.1f}" for p, t in {**row.paths_us, **row.peers_us}.items())
        print(
            f"{dtype_name} {model:10s} {k:5d}x{n:<5d} b={m:<4d} cublas {row.cublas_us:8.1f}  ours "
            f"{row.ours_us:8.1f} ({row.cublas_us / row.ours_us:5.2f}x)  {extra}  floor {row.floor_us:6.1f}",
            flush=True,
        )
    return rows


def summary_table(rows: list[Row], device: str, peers_note: str, rounds: int = ROUNDS) -> str:
    """Per-model sums over the four layers, one line per dtype and batch; ratios = cuBLAS / kernel."""
    paths = sorted({p for r in rows for p in r.paths_us})
    peers = [p for p in PEER_NAMES if any(p in r.peers_us for r in rows)]
    lines = [
        f"device: {device}   (g{GROUP}, CUDA graphs, weights rotated > 256 MB, best of {rounds} rounds; "
        "sums over the 4 layers in us; (x) = cuBLAS time / kernel time)",
        f"peers: {', '.join(peers) if peers else 'skipped: ' + peers_note}",
        f"{'dtype':5s} {'shape':10s} {'batch':>5s} {'cublas':>8s} {'ours':>16s} {'of floor':>8s} "
        + " ".join(f"{p:>16s}" for p in paths + peers)
        + ("  ours / best peer" if peers else ""),
    ]

    def cell(total: float, base: float) -> str:
        return f"{total:8.1f} ({base / total:4.2f}x)" if total == total else f"{'nan':>16s}"

    for dtype in DTYPES:
        for model in MODELS:
            for m in sorted({r.batch for r in rows if r.model == model and r.dtype == dtype}):
                sel = [r for r in rows if r.model == model and r.batch == m and r.dtype == dtype]
                base, ours = sum(r.cublas_us for r in sel), sum(r.ours_us for r in sel)
                floor = sum(r.floor_us for r in sel)
                others = {p: sum(r.paths_us.get(p, math.nan) for r in sel) for p in paths}
                others.update({p: sum(r.peers_us.get(p, math.nan) for r in sel) for p in peers})
                line = (
                    f"{dtype:5s} {model:10s} {m:5d} {base:8.1f} {cell(ours, base)} {floor / ours:8.2f} "
                    + " ".join(cell(others[p], base) for p in paths + peers)
                )
                peer_times = [others[p] for p in peers if others[p] == others[p]]
                if peer_times:
                    line += f"  {min(peer_times) / ours:5.2f}x"
                lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench.json (default $OUT)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=list(DTYPES))
    parser.add_argument(
        "--paths",
        nargs="*",
        default=[],
        choices=["mma", "wgmma", "dense"],
        help="also time our op with these paths forced",
    )
    parser.add_argument(
        "--peers",
        default=os.environ.get("MARLIN_PEERS"),
        help="vLLM's _C_stable_libtorch.abi3.so (or .so.xz, or its folder), scalar_type.py beside it",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--json", default="bench.json", help="file name of the JSON written to --out")
    args = parser.parse_args()
    if not kernel.kernel_available():
        raise SystemExit("the marlin CUDA kernel is not available (no GPU or the build failed)")
    device = torch.cuda.get_device_name()
    known = [v for key, v in CEILINGS.items() if key in device]
    ceilings = known[0] if known else CEILINGS["H100"]
    if not known:
        print(f"no measured ceilings for {device}; the floor uses the H100's")
    peers, why = load_peers(args.peers)
    print(
        f"device: {device}; wgmma kernel: {kernel.wgmma_available()}; peers: "
        f"{'vLLM marlin_gemm, machete_mm' if peers else 'skipped (' + why + ')'}",
        flush=True,
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    checks, rows = [], []
    for dtype_name in args.dtypes:
        if peers is not None:
            checks += check_peers(peers, DTYPES[dtype_name], gen)
        for model in args.models:
            for k, n in MODELS[model]:
                rows.extend(bench_shape(model, k, n, dtype_name, args, peers, ceilings, gen))
                torch.cuda.empty_cache()
    table = summary_table(rows, device, why, args.rounds)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        payload = {
            "device": device,
            "torch": torch.__version__,
            "group_size": GROUP,
            "ceilings": {"bytes_per_s": ceilings[0], "flop_per_s": ceilings[1]},
            "peers": "vllm" if peers else why,
            "peer_checks": checks,
            "rows": [asdict(r) for r in rows],
            "summary": table,
        }
        (Path(args.out) / args.json).write_text(json.dumps(payload, indent=1))
    print(table)


if __name__ == "__main__":
    main()
