"""scripts/bf16_rounding.py: its two numerics against a float64 product of the same bf16 inputs (CPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from gptq.linear import MarlinLinear

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bf16_rounding.py"


def _script():
    spec = importlib.util.spec_from_file_location("bf16_rounding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bf16_rounding"] = module
    spec.loader.exec_module(module)
    return module


def _layer_and_input(seed: int = 0) -> tuple[MarlinLinear, torch.Tensor, torch.Tensor]:
    """A 320 x 192 layer (K padded to 384), g64, bf16 scales with full 8-bit mantissas; bf16 input [6, 320];
    and the float64 weight [320, 192] of its codes and scales."""
    gen = torch.Generator().manual_seed(seed)
    n, k, g = 192, 320, 64
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = ((1 + torch.rand(n, k // g, generator=gen)) * 2.0 ** -7).bfloat16()
    layer = MarlinLinear.from_codes(codes, scales, g, scale_dtype=torch.bfloat16)
    weight = ((codes.double() - 8) * scales.double().repeat_interleave(g, 1)).T
    x = torch.randn(6, k, generator=gen).bfloat16()
    return layer, x, weight


def test_exact_is_the_rounded_float64_product_and_rounded_rounds_the_weights_first() -> None:
    mod = _script()
    layer, x, weight = _layer_and_input()
    ref = x.double() @ weight
    x2 = torch.nn.functional.pad(x, (0, layer.packed.k_pad - x.shape[1]))
    exact = mod.mode_output(layer, x2, "exact")[:, : weight.shape[1]]
    rounded = mod.mode_output(layer, x2, "rounded")[:, : weight.shape[1]]
    assert exact.dtype == rounded.dtype == torch.bfloat16
    # float32 sums rounded to bf16: at most one bf16 step from the rounded float64 product.
    step = ref.abs().to(torch.bfloat16).double() * 2.0 ** -7
    assert ((exact.double() - ref.to(torch.bfloat16).double()).abs() <= step + 1e-30).all()
    # The peers' numerics: the float64 product of the bf16-rounded weights, rounded to bf16.
    w_bf16 = weight.to(torch.bfloat16).double()
    assert not torch.equal(w_bf16, weight), "these scales must need more than bf16's mantissa once multiplied"
    ref_rounded_weights = x.double() @ w_bf16
    step_r = ref_rounded_weights.abs().to(torch.bfloat16).double() * 2.0 ** -7
    assert ((rounded.double() - ref_rounded_weights.to(torch.bfloat16).double()).abs() <= step_r + 1e-30).all()
    err_exact = ((exact.double() - ref).norm() / ref.norm()).item()
    err_rounded = ((rounded.double() - ref).norm() / ref.norm()).item()
    assert err_exact < err_rounded < 4e-3, (err_exact, err_rounded)


def test_numerics_routes_every_call_and_restores_the_layer() -> None:
    mod = _script()
    layer, x, weight = _layer_and_input(seed=1)
    original = MarlinLinear.forward
    errors: list[tuple[float, float]] = []
    with mod.numerics("exact", errors):
        out = layer(x)
        layer(x.float())  # not bf16: the layer's own path, not counted
    assert MarlinLinear.forward is original
    assert len(errors) == 1
    x2 = torch.nn.functional.pad(x, (0, layer.packed.k_pad - x.shape[1]))
    assert torch.equal(out, mod.mode_output(layer, x2, "exact")[:, :192])
    ref = x.double() @ weight
    sq_err, sq_norm = errors[0]
    assert abs(sq_norm - ref.square().sum().item()) < 1e-9 * sq_norm
    assert abs(sq_err - (out.double() - ref).square().sum().item()) < 1e-6 * sq_norm
