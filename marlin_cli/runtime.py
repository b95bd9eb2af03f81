"""The machine a run happens on: device and dtype resolution, versions, memory. One owner for each.

Every command that takes ``--device`` / ``--dtype`` resolves them here, and every record of a run
(checkpoint run record, perplexity JSON, lm-eval JSON, reproduction table) takes its versions here.
"""

from __future__ import annotations

import platform
import resource

import torch
import transformers

from marlin_cli import __version__
from marlin_cli.errors import MarlinError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> str:
    """``device`` checked against what is present; ``None`` picks CUDA when available, else CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith(("cpu", "cuda")):
        raise MarlinError(f"--device must be cpu or cuda[:N]; got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MarlinError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    return device


def default_dtype(device: str) -> torch.dtype:
    """float32 on the CPU (fp16 matmuls there are slow and inexact), float16 on a GPU (the kernel's dtype)."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def cpu_has_bf16_matmul() -> bool:
    """True where oneDNN runs bf16 matrix products natively on this CPU (AVX512-BF16 or AMX): there they run
    about 3.7x faster than float32 (2-core AMD EPYC of README.md's measurements: 366 vs 99 GFLOP/s)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def quantize_dtype(device: str, method: str) -> torch.dtype:
    """The dtype the decoder layers run in while quantizing with ``method``: :func:`default_dtype`, except the
    ``fast`` and ``best`` methods on a CPU with native bf16 products, which run in bfloat16. Their statistic,
    the mean squared input of each feature, moves by bf16's rounding (2^-9 relative), far below what changes a
    scale choice, and the block tuning's signed steps need only the gradient's sign (the solver still reads the
    weights as stored, not their bf16 copies: :func:`marlin_cli.pipeline.sequential.quantize_sequential`); GPTQ's methods keep
    float32 (their Hessians feed a Cholesky solve, and the reproduction's figures)."""
    if method in ("fast", "best") and not device.startswith("cuda") and cpu_has_bf16_matmul():
        return torch.bfloat16
    return default_dtype(device)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The compute dtype: ``auto`` is :func:`default_dtype`; else one of :data:`DTYPES`."""
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise MarlinError(f"--dtype must be auto or one of {', '.join(DTYPES)}; got '{dtype}'")
    return DTYPES[dtype]


def versions() -> dict[str, str]:
    """Versions of what produced a number: marlin, python, torch, transformers, and the CUDA runtime."""
    return {
        "marlin": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": str(torch.version.cuda),
    }


def device_description(device: str) -> str:
    """A human name for the device: the GPU's name, or the CPU and the number of torch threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (10^6 bytes; Linux reports ru_maxrss in KiB).

    Every size this tool prints is decimal (MB = 10^6 bytes, GB = 10^9), as the checkpoint sizes of
    ``marlin reproduce`` and the README are."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
