"""The Marlin FP16/BF16 x INT4 product as a ``torch.library`` custom op, ``marlin::gemm``.

On CUDA tensors the op calls our kernel in ``csrc/`` (built with ninja by ``torch.utils.cpp_extension``
on first use and cached by torch); on any other device it computes the reference product
:func:`gptq.format.reference_matmul`, so the same calls and tests run everywhere. The op has a fake (meta)
implementation, so it traces under ``torch.compile`` and can be captured in CUDA graphs.

The op keeps no state between calls: its fp32 split-k scratch comes from torch's caching allocator on
each call (inside a CUDA graph, from the graph's pool).

Public API: :func:`marlin_gemm`, :func:`kernel_available`.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path
from types import ModuleType

import torch

from gptq import format as fmt

SOURCES = ("marlin_binding.cpp", "marlin_kernel.cu", "marlin_dequant.cu")
"""Translation units of the extension, in csrc/ (installed as the package ``marlin_csrc``)."""
HEADERS = ("marlin_kernel.h", "marlin_ptx.cuh")
EXTENSION_NAME = "marlin_cuda_ext"

PATH_AUTO, PATH_FUSED, PATH_DENSE = 0, 1, 2
"""``path`` argument of the op: choose automatically, force the fused kernel, or force
dequantize-then-cuBLAS."""
DENSE_MIN_ROWS = 129
"""From this many rows on, fp16 inputs use dequantize + cuBLAS. The fused kernel handles 64 fp16 rows
(32 bf16 rows) per pass over the weights; measured on the H100 it beats dequantize + cuBLAS up to 128
rows and loses at 256 (Llama-2-7B shapes). bf16 inputs always use the fused kernel: rounding the
dequantized weights to bf16 costs about 2e-3 relative error, above the 1e-3 the fused kernel meets."""


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
    flags = ["-O3", "-lineinfo"]
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=flags,
        verbose=os.environ.get("MARLIN_BUILD_VERBOSE", "") == "1",
    )


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


def uses_dense_path(m: int, dtype: torch.dtype, path: int) -> bool:
    """Whether a CUDA call with ``m`` rows of ``dtype`` runs dequantize + cuBLAS instead of the fused kernel."""
    return path == PATH_DENSE or (path == PATH_AUTO and dtype == torch.float16 and m >= DENSE_MIN_ROWS)


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
    if uses_dense_path(m, a.dtype, path):
        return a @ _checked(ext.dequantize(qweight, scales, group_size))
    return _checked(ext.gemm(a, qweight, scales, group_size))


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
        path: PATH_AUTO (default), PATH_FUSED (the fused kernel at any M) or PATH_DENSE (dequantize into a
            dense [K_pad, N_pad] matrix, then cuBLAS); only affects CUDA.

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
    if path not in (PATH_AUTO, PATH_FUSED, PATH_DENSE):
        raise ValueError(f"path must be PATH_AUTO (0), PATH_FUSED (1) or PATH_DENSE (2), got {path}")
    out = torch.ops.marlin.gemm(a2, qweight, scales, group_size, path)
    return out.reshape(*lead, n_pad)
