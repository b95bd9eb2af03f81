"""MarlinLinear on the CPU reference path against a float64 product of the dequantized weight."""

from __future__ import annotations

import pytest
import torch

from gptq.linear import MarlinLinear


@pytest.mark.parametrize("n,k,g", [(192, 576, 128), (1536, 576, 64), (576, 1536, -1), (70, 100, 32)])
def test_forward_equals_float64_dequantized_product(n: int, k: int, g: int) -> None:
    gen = torch.Generator().manual_seed(n * k)
    groups = 1 if g == -1 else -(-k // g)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen)
    layer = MarlinLinear.from_codes(codes, scales, g, bias=bias).float()
    x = torch.randn(2, 3, k, generator=gen)
    per = k if g == -1 else g
    s16 = scales.half().double()
    w = (codes.double() - 8) * s16.repeat_interleave(per, 1)[:, :k]
    want = x.double() @ w.T + bias.half().double()
    got = layer(x)
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


def test_state_dict_round_trip_and_cache_invalidation() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 128), generator=gen, dtype=torch.uint8)
    a = MarlinLinear.from_codes(codes, torch.rand(64, 2, generator=gen) + 0.1, 64)
    b = MarlinLinear(128, 64, 64)
    x = torch.randn(4, 128, generator=gen)
    before = b.float()(x)  # fills b's dense cache with the all-ones scales / zero codes
    assert torch.count_nonzero(before) == 0
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.float()(x), a.float()(x))
    assert set(a.state_dict()) == {"qweight", "scales", "shape"}
