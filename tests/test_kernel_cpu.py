"""The ``marlin::gemm`` op off CUDA: the CPU fallback equals the reference product, batch dimensions are
flattened, the fake implementation gives the right shape, and bad inputs raise before any launch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gptq import format as fmt
from gptq import kernel


def _packed(
    k: int, n: int, g: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, fmt.PackedShape]:
    """Random codes and non-zero scales of a [k, n] matrix, packed: (qweight, scales, shape)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g == -1 else -(-k // g)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).to(dtype)
    return fmt.pack(codes, scales, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "m,k,n,g", [(1, 64, 64, 32), (3, 576, 192, 128), (17, 192, 576, 64), (5, 640, 128, -1)]
)
def test_cpu_fallback_equals_reference(m: int, k: int, n: int, g: int, dtype: torch.dtype) -> None:
    qweight, scales, shape = _packed(k, n, g, dtype, seed=m + k + n)
    a = torch.randn(m, shape.k_pad, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = kernel.marlin_gemm(a, qweight, scales, g)
    assert out.shape == (m, shape.n_pad) and out.dtype == dtype
    assert torch.equal(out, fmt.reference_matmul(a, qweight, scales, g))
    # And independently of format.py's helpers: float64 product of the unpacked codes and scales.
    codes, nat = fmt.unpack(qweight, scales, shape)
    per = shape.k if g == -1 else g
    w = (codes.double() - 8) * nat.double().repeat_interleave(per, 0)[: shape.k]
    want = a[:, : shape.k].double() @ w
    got = out[:, : shape.n].double()
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bounded by the output's 16-bit rounding


def test_batch_dims_are_flattened() -> None:
    qweight, scales, shape = _packed(128, 64, 64, torch.float16, seed=1)
    a = torch.randn(2, 3, shape.k_pad).half()
    out = kernel.marlin_gemm(a, qweight, scales, 64)
    assert out.shape == (2, 3, shape.n_pad)
    assert torch.equal(out.reshape(6, -1), kernel.marlin_gemm(a.reshape(6, -1), qweight, scales, 64))


def test_empty_batch() -> None:
    qweight, scales, shape = _packed(128, 64, 64, torch.float16, seed=6)
    out = kernel.marlin_gemm(torch.empty(0, 3, shape.k_pad, dtype=torch.float16), qweight, scales, 64)
    assert out.shape == (0, 3, shape.n_pad)


def test_fake_impl_shape() -> None:
    qweight, scales, shape = _packed(256, 192, 128, torch.float16, seed=2)
    a = torch.randn(7, shape.k_pad).half()
    meta = [t.to("meta") for t in (a, qweight, scales)]
    out = torch.ops.marlin.gemm(meta[0], meta[1], meta[2], 128, kernel.PATH_AUTO)
    assert out.shape == (7, shape.n_pad) and out.dtype == torch.float16 and out.device.type == "meta"


def test_opcheck_cpu() -> None:
    qweight, scales, shape = _packed(128, 128, 32, torch.float16, seed=3)
    a = torch.randn(4, shape.k_pad).half()
    torch.library.opcheck(torch.ops.marlin.gemm.default, (a, qweight, scales, 32, kernel.PATH_AUTO))


def _bad_cases() -> list[tuple[str, dict, str]]:
    return [
        ("a float32", {"a": lambda a: a.float()}, "a must be float16 or bfloat16"),
        ("a wrong K", {"a": lambda a: a[:, :64]}, "packs K_pad=128"),
        ("scales dtype", {"scales": lambda s: s.bfloat16()}, "scales dtype"),
        ("scales shape", {"scales": lambda s: s[:1]}, "scales must be [4, 64]"),
        ("qweight dtype", {"qweight": lambda q: q.long()}, "qweight must be int32"),
        ("qweight odd N", {"qweight": lambda q: q[:, :96]}, "does not pack"),
        ("group size", {"g": lambda g: 48}, "group size 48"),
        (
            "group does not divide K",
            {"g": lambda g: 128, "qweight": lambda q: q, "scales": lambda s: s[:1]},
            "does not divide",
        ),
    ]


@pytest.mark.parametrize("name,change,message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise(name: str, change: dict, message: str) -> None:
    qweight, scales, shape = _packed(128, 64, 32, torch.float16, seed=4)
    args = {"a": torch.randn(2, shape.k_pad).half(), "qweight": qweight, "scales": scales, "g": 32}
    if name == "group does not divide K":
        qweight, scales, shape = _packed(64, 64, 32, torch.float16, seed=5)
        args = {"a": torch.randn(2, 64).half(), "qweight": qweight, "scales": scales, "g": 32}
    for key, fn in change.items():
        args[key] = fn(args[key])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kernel.marlin_gemm(args["a"], args["qweight"], args["scales"], args["g"])


def test_kernel_available_is_false_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; covered by tests/test_kernel_gpu.py")
    assert kernel.kernel_available() is False


def test_csrc_holds_what_builds() -> None:
    """csrc/ holds the extension's sources and headers (kernel.SOURCES, kernel.HEADERS) and nothing else,
    and every header a source includes with quotes is one of them."""
    csrc = Path(kernel.__file__).resolve().parent.parent / "csrc"
    listed = set(kernel.SOURCES) | set(kernel.HEADERS)
    present = {
        p.name
        for p in csrc.iterdir()
        if p.name not in ("__init__.py", "__pycache__") and not (p.is_dir() and not any(p.iterdir()))
    }
    assert present == listed, f"unlisted: {sorted(present - listed)}, missing: {sorted(listed - present)}"
    for name in listed:
        for include in re.findall(r'#include "([^"]+)"', (csrc / name).read_text()):
            assert include in kernel.HEADERS, f"{name} includes {include}, which is not in kernel.HEADERS"
