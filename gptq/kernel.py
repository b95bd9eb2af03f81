"""The Marlin FP16/BF16 x INT4 product as a ``torch.library`` custom op, ``marlin::gemm``.

On CUDA tensors the op calls our kernel in ``csrc/`` (built with ninja by ``torch.utils.cpp_extension``
on first use and cached by torch); on any other device it computes the reference product
:func:`gptq.format.reference_matmul`, so the same calls and tests run everywhere. The op has a fake (meta)
implementation, so it traces under ``torch.compile`` and can be captured in CUDA graphs.

The op keeps no state between calls: its fp32 split-k scratch comes from torch's caching allocator on
each call (inside a CUDA graph, from the graph's pool).

Public API: :func:`marlin_gemm`, :func:`kernel_available`, :func:`wgmma_available`, :func:`dense_min_rows`.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path
from types import ModuleType

import torch

from gptq import format as fmt

SOURCES = ("marlin_binding.cpp", "marlin_kernel.cu", "marlin_wgmma.cu", "marlin_dequant.cu")
"""Translation units of the extension, in csrc/ (installed as the package ``marlin_csrc``)."""
HEADERS = (
    "marlin_kernel.h",
    "marlin_sm90.h",
    "marlin_launch.cuh",
    "marlin_layout.cuh",
    "marlin_plan.h",
    "marlin_ptx.cuh",
    "marlin_tma.cuh",
    "marlin_wgmma.cuh",
    "marlin_wgmma_tma.cuh",
)
EXTENSION_NAME = "marlin_cuda_ext"

PATH_AUTO, PATH_FUSED, PATH_DENSE, PATH_MMA, PATH_WGMMA = 0, 1, 2, 3, 4
"""``path`` argument of the op: choose automatically; the fused kernel at any M (the faster one for the
device and M); dequantize-then-cuBLAS; the mma.sync fused kernel (sm_80+); the Hopper wgmma fused kernel
(compute capability 9.0, extension built for arch 9.0a; ValueError elsewhere)."""
_KERNEL_CODE = {PATH_AUTO: 0, PATH_FUSED: 0, PATH_MMA: 1, PATH_WGMMA: 2}
"""``path`` -> the extension's MarlinKernel code (csrc/marlin_kernel.h)."""
DENSE_MIN_ROWS = 129
"""Without the wgmma kernel (GPUs other than sm_90), fp16 inputs use dequantize + cuBLAS from this many
rows on: the mma.sync kernel handles 64 fp16 rows (32 bf16 rows) per pass over the weights; measured on the
H100 it beats dequantize + cuBLAS up to 128 rows and loses at 256 (Llama-2-7B shapes). bf16 inputs always
use a fused kernel: rounding the dequantized weights to bf16 costs about 2e-3 relative error, above the
1e-3 the fused kernels meet."""
DENSE_MIN_ROWS_WGMMA = {"H100": 6144, "": 1024}
"""With the wgmma kernels (sm_90), fp16 inputs use dequantize + cuBLAS from this many rows on (prompt prefill
sizes), by device name substring ("" for any other sm_90 GPU). Sums over the four Llama-2 layers, g128, us,
wgmma / dense, each pair measured in one run with ``scripts/bench_kernel.py --paths wgmma dense --rounds 1``:
- H100 80GB HBM3, the TMA wgmma kernel with persistent blocks and the stmatrix epilogue (2026-12-07, round 9,
  one round): 7B 2048 rows 1147.5 / 1367.0, 4096 rows 2562.2 / 2646.3, 6144 rows 3924.6 / 3872.8, 8192 rows
  5290.3 / 5064.2; 70B 2048 rows 5163.7 / 5713.7, 4096 rows 10390.8 / 10724.3, 6144 rows 15795.0 / 16045.2,
  8192 rows 24288.2 / 21086.7. The fused kernel wins up to 4096 rows (3-16%), 6144 rows is a tie (7B dense
  1.3% faster, 70B fused 1.6%), dense wins at 8192 (4%, 13%): the threshold is 6144. (Round 8, before the
  persistent blocks: fused faster to 2048 rows; 92d1582, before the waves: crossover near 1200 rows.)
- H200, the cp.async wgmma kernel before the TMA producer (round 4): 7B 768 rows 582.9 / 565.0, 1024 rows
  787.7 / 737.1, 1536 rows 1208.6 / 1043.9; 70B 768 rows 2310.3 / 2590.9, 1024 rows 3149.0 / 3117.2; kept
  at 1024 for GPUs other than the H100 until the TMA kernel is measured there (on the H100 it and the waves
  moved the crossover from about 1200 rows past 2048, so it can only have moved up)."""


def _source_dir() -> Path:
    """Directory holding the .cu/.cpp sources: the installed ``marlin_csrc`` package, else the repo's csrc/."""
    try:
        candidate = Path(str(importlib.resources.files("marlin_csrc")))
        if (candidate / SOURCES[0]).is_file():
            return candidate
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "csrc"


@functools.cache
def _extension() -> ModuleType:
    """Build (first call; ninja, cached under TORCH_EXTENSIONS_DIR) and import the CUDA extension."""
    from torch.utils import cpp_extension

    src = _source_dir()
    missing = [name for name in SOURCES + HEADERS if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"marlin kernel sources missing in {src}: {missing}")
    # No -std flag: cpp_extension passes the C++ standard torch itself was built with (C++20 here).
    flags = ["-O3", "-lineinfo", *_arch_flags()]
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=flags,
        verbose=os.environ.get("MARLIN_BUILD_VERBOSE", "") == "1",
    )


def _arch_flags() -> list[str]:
    """nvcc flags for the GPU architectures to build.

    TORCH_CUDA_ARCH_LIST, when set, is torch's to apply; an entry "9.0a" there turns on the wgmma kernel.
    Unset, the build targets the current device, as sm_90a on compute capability 9.0 (the wgmma kernel
    needs the arch-specific target). Passing -gencode ourselves stops cpp_extension adding its own.
    """
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if arch_list:
        return ["-DMARLIN_SM90A"] if "9.0a" in arch_list.replace(";", " ").split() else []
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a", "-DMARLIN_SM90A"]
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def wgmma_available(device: torch.device | int | None = None) -> bool:
    """Whether the Hopper wgmma kernel runs on ``device`` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return False
    return bool(_extension().wgmma_available(_device_index(device)))


def _checked(result: tuple[torch.Tensor | None, int, str]) -> torch.Tensor:
    """Unpack an extension call's (tensor, error kind, message): raise ValueError (1) or RuntimeError (2)."""
    out, kind, message = result
    if kind == 1:
        raise ValueError(message)
    if kind != 0 or out is None:
        raise RuntimeError(message or "marlin extension returned no result")
    return out


def dequantize_cuda(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dense [K_pad, N_pad] weights in ``scales.dtype`` computed by the CUDA dequantization kernel."""
    return _checked(_extension().dequantize(qweight, scales, group_size))


def kernel_available() -> bool:
    """True when a CUDA device is present and the extension builds and loads."""
    if not torch.cuda.is_available():
        return False
    try:
        _extension()
    except (OSError, RuntimeError, ImportError) as err:  # compiler missing, build error, bad .so
        import warnings

        warnings.warn(f"marlin CUDA kernel unavailable: {err}", RuntimeWarning, stacklevel=2)
        return False
    return True


def check_inputs(
    a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[int, int, int]:
    """Validate shapes, dtypes and devices; return (M, K_pad, N_pad). Raises ValueError naming the tensor."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"a must be float16 or bfloat16, got {a.dtype}")
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D [M, K_pad] here, got shape {list(a.shape)}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(
            f"qweight must be int32 [K_pad/16, 2*N_pad], got {qweight.dtype} {list(qweight.shape)}"
        )
    m, k = a.shape
    k_pad, n_pad = qweight.shape[0] * 16, qweight.shape[1] // 2
    if qweight.shape[1] % 2 or n_pad % fmt.N_ALIGN or k_pad % fmt.K_ALIGN or n_pad == 0 or k_pad == 0:
        raise ValueError(
            f"qweight {list(qweight.shape)} does not pack a K x N matrix with K and N positive "
            f"multiples of 64 (K={k_pad}, N={n_pad})"
        )
    if k != k_pad:
        raise ValueError(
            f"a is [{m}, {k}] but qweight {list(qweight.shape)} packs K_pad={k_pad} (N_pad={n_pad}); "
            "pad a's last dimension with zeros to K_pad"
        )
    fmt.check_group_size(group_size)
    if group_size != -1 and k_pad % group_size:
        raise ValueError(f"group_size {group_size} does not divide K_pad={k_pad}")
    groups = 1 if group_size == -1 else k_pad // group_size
    if scales.dim() != 2 or tuple(scales.shape) != (groups, n_pad):
        raise ValueError(
            f"scales must be [{groups}, {n_pad}] for K_pad={k_pad}, N_pad={n_pad}, "
            f"group_size={group_size}; got {list(scales.shape)}"
        )
    if scales.dtype != a.dtype:
        raise ValueError(
            f"scales dtype {scales.dtype} must match a's dtype {a.dtype} (M={m}, K={k}, N={n_pad})"
        )
    if qweight.device != a.device or scales.device != a.device:
        raise ValueError(
            f"a ({a.device}), qweight ({qweight.device}) and scales ({scales.device}) must be on one device"
        )
    return m, k_pad, n_pad


def _device_index(device: torch.device | int | None) -> int:
    if isinstance(device, int):
        return device
    if device is not None and torch.device(device).index is not None:
        return torch.device(device).index
    return torch.cuda.current_device()


@functools.cache
def _dense_min_rows(index: int) -> int:
    if not wgmma_available(index):
        return DENSE_MIN_ROWS
    name = torch.cuda.get_device_name(index)
    return next(
        (rows for key, rows in DENSE_MIN_ROWS_WGMMA.items() if key and key in name), DENSE_MIN_ROWS_WGMMA[""]
    )


def dense_min_rows(device: torch.device | int | None = None) -> int:
    """Rows from which fp16 inputs on CUDA ``device`` (default: the current one) take dequantize + cuBLAS under
    PATH_AUTO: DENSE_MIN_ROWS without the wgmma kernels, else DENSE_MIN_ROWS_WGMMA's entry for the device."""
    return _dense_min_rows(_device_index(device))


def uses_dense_path(m: int, dtype: torch.dtype, path: int, device: torch.device | int | None = None) -> bool:
    """Whether a CUDA call with ``m`` rows of ``dtype`` on ``device`` runs dequantize + cuBLAS instead of a
    fused kernel."""
    if path == PATH_DENSE:
        return True
    if path != PATH_AUTO or dtype != torch.float16 or m < DENSE_MIN_ROWS:
        return False
    return m >= dense_min_rows(device)


@torch.library.custom_op("marlin::gemm", mutates_args=())
def _gemm(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    path: int,
) -> torch.Tensor:
    """Non-CUDA devices: the reference product (float32 accumulation), cast to ``a.dtype``."""
    check_inputs(a, qweight, scales, group_size)
    return fmt.reference_matmul(a, qweight, scales, group_size)


@_gemm.register_kernel("cuda")
def _gemm_cuda(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    path: int,
) -> torch.Tensor:
    m, _, _ = check_inputs(a, qweight, scales, group_size)
    ext = _extension()
    if uses_dense_path(m, a.dtype, path, a.device):
        return a @ _checked(ext.dequantize(qweight, scales, group_size))
    return _checked(ext.gemm(a, qweight, scales, group_size, _KERNEL_CODE[path]))


@_gemm.register_fake
def _gemm_fake(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    path: int,
) -> torch.Tensor:
    m, _, n_pad = check_inputs(a, qweight, scales, group_size)
    return a.new_empty((m, n_pad))


def marlin_gemm(
    a: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """``a @ dequant(B)`` for B packed in the Marlin format (:mod:`gptq.format`), fp32 accumulation.

    Args:
        a: activations [..., K_pad], float16 or bfloat16, any strides (flattened to [M, K_pad]; M = 0
            gives an empty result).
            Columns beyond the layer's real K must be zero (or meet zero weights, as padding has).
        qweight: int32 [K_pad / 16, 2 * N_pad], the packed 4-bit codes (:func:`gptq.format.pack`):
            16x16 tiles, each 16x64 strip in mma-fragment lane order, 8 codes per int32 interleaved.
        scales: [K_pad / group_size, N_pad] (or [1, N_pad] when ``group_size == -1``), same dtype as ``a``,
            columns permuted as :mod:`gptq.format` documents.
        group_size: 32, 64, 128, or -1 for one scale per output column.
        path: PATH_AUTO (default), PATH_FUSED (a fused kernel at any M), PATH_DENSE (dequantize into a
            dense [K_pad, N_pad] matrix, then cuBLAS), PATH_MMA (the mma.sync fused kernel) or PATH_WGMMA
            (the Hopper fused kernel; compute capability 9.0 only); only affects CUDA.

    Returns:
        [..., N_pad] in ``a.dtype``; every element is written.

    Raises:
        ValueError: wrong dtype, shape or device, before anything is launched.
    """
    if a.dim() < 1 or a.shape[-1] == 0:
        raise ValueError(f"a must be [..., K_pad] with K_pad > 0, got shape {list(a.shape)}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1]).contiguous()
    _, _, n_pad = check_inputs(a2, qweight, scales, group_size)
    if a2.shape[0] == 0:
        return a.new_empty(*lead, n_pad)
    if path not in (PATH_AUTO, PATH_FUSED, PATH_DENSE, PATH_MMA, PATH_WGMMA):
        raise ValueError(
            "path must be PATH_AUTO (0), PATH_FUSED (1), PATH_DENSE (2), PATH_MMA (3) or PATH_WGMMA (4), "
            f"got {path}"
        )
    out = torch.ops.marlin.gemm(a2, qweight, scales, group_size, path)
    return out.reshape(*lead, n_pad)
