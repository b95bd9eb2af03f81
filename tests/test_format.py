"""The Marlin format: exact round trips, the documented lane/nibble layout, padding, and the reference product."""

from __future__ import annotations

import pytest
import torch
from checkpoint_cache import signed_grid, signed_grid_random

from gptq import format as fmt
from gptq.linear import MarlinLinear

SIGNS = ["positive", "signed"]
"""Scale data of the tests: uniform codes with positive scales, or issue 18's signed grid (about half the
scales negative: every group whose largest-magnitude weight is positive)."""


def _random(k: int, n: int, g: int, seed: int, sign: str = "positive") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [K, N] in 0..15 and fp16 scales [ceil(K / g) or 1, N] (B = W^T orientation)."""
    if sign == "signed":
        codes, scales = signed_grid_random(n, k, g, seed)
        return codes.T.long(), scales.T.half()
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g == -1 else -(-k // g)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).half()
    return codes, scales


def _dense64(codes: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """B = (q - 8) * s in float64 [K, N] from codes [K, N] and scales [G, N]: the definition."""
    k = codes.shape[0]
    return (codes.double() - 8) * scales.double().repeat_interleave(k if g == -1 else g, 0)[:k]


def test_signed_grid_puts_each_groups_larger_side_on_the_16th_level() -> None:
    """The signed test data is what issue 18 describes (so the tests below do exercise negative scales)."""
    n, k, g = 192, 576, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.02
    codes, scales = signed_grid(w, g)
    assert 0.4 < float((scales < 0).double().mean()) < 0.6
    groups = w.reshape(n, k // g, g)
    extreme_at = groups.abs().argmax(dim=2, keepdim=True)
    extreme = groups.gather(2, extreme_at)[..., 0]
    assert torch.equal(scales < 0, extreme > 0)  # negative scale exactly where the extreme is positive
    assert (codes.reshape(n, k // g, g).gather(2, extreme_at) == 0).all()  # the extreme gets q - 8 = -8
    step = scales.abs().repeat_interleave(g, 1)
    err = (w - (codes.double() - 8) * scales.repeat_interleave(g, 1)).abs()
    # round to nearest on the grid; the other side reaches 7 steps only, so up to one step is lost at code 15
    assert (err[codes < 15] <= step[codes < 15] * (0.5 + 1e-3)).all()
    assert (err[codes == 15] <= step[codes == 15] * (1 + 1e-3)).all()


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("k,n,g", [(64, 64, 32), (576, 192, 128), (576, 1536, 64), (1536, 576, -1), (96, 80, 32),
                                   (16, 8, -1), (4096, 128, 128)])
def test_pack_unpack_round_trip(k: int, n: int, g: int, sign: str) -> None:
    codes, scales = _random(k, n, g, seed=k + n, sign=sign)
    assert (sign == "signed") == bool((scales < 0).any())
    qweight, packed, shape = fmt.pack(codes, scales, g)
    assert qweight.dtype == torch.int32 and list(qweight.shape) == [shape.k_pad // 16, 2 * shape.n_pad]
    assert list(packed.shape) == [shape.num_groups, shape.n_pad]
    codes2, scales2 = fmt.unpack(qweight, packed, shape)
    assert torch.equal(codes2, codes.int())
    assert torch.equal(scales2, scales)


@pytest.mark.parametrize("k,n,g,kp,np_", [(576, 192, 128, 640, 192), (576, 192, 64, 576, 192), (576, 1536, -1, 576, 1536),
                                          (100, 70, 32, 128, 128), (4096, 11008, 128, 4096, 11008)])
def test_padded_shape(k: int, n: int, g: int, kp: int, np_: int) -> None:
    s = fmt.padded_shape(k, n, g)
    assert (s.k_pad, s.n_pad) == (kp, np_)
    assert s.k_pad % 64 == 0 and s.n_pad % 64 == 0 and (g == -1 or s.k_pad % g == 0)


def test_lane_layout_matches_mma_fragments() -> None:
    """Independent of the implementation: lane t's word j holds the m16n8k16 B-fragment codes as documented."""
    k, n = 16, 64
    codes = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(3))
    qweight, _, _ = fmt.pack(codes, torch.ones(1, n, dtype=torch.float16), -1)
    words = qweight.view(-1)  # 16 x 64 strip -> 128 int32: lane t owns words 4t..4t+3, one per tile
    nibble_of_index = [0, 4, 1, 5, 2, 6, 3, 7]  # in-group code i sits at nibble position nibble_of_index[i]
    for lane in range(32):
        for tile in range(4):
            word = int(words[4 * lane + tile]) & 0xFFFFFFFF
            expected = []
            for half in (0, 1):
                for kk in (2 * (lane % 4), 2 * (lane % 4) + 1, 2 * (lane % 4) + 8, 2 * (lane % 4) + 9):
                    expected.append(int(codes[kk, 16 * tile + lane // 4 + 8 * half]))
            got = [(word >> (4 * nibble_of_index[i])) & 0xF for i in range(8)]
            assert got == expected, (lane, tile)
    # The LOP3 pairing: nibbles 0 and 4 are the two k-adjacent codes of the first B register.
    w0 = int(words[0]) & 0xFFFFFFFF
    assert (w0 & 0xF, (w0 >> 16) & 0xF) == (int(codes[0, 0]), int(codes[1, 0]))


def test_scale_permutation_order() -> None:
    n = 64
    scales = torch.arange(n, dtype=torch.float16).view(1, n)
    _, packed, _ = fmt.pack(torch.full((64, n), 8), scales, 64)
    assert packed.view(-1)[:9].tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 1]
    _, packed, _ = fmt.pack(torch.full((64, n), 8), scales, -1)
    assert packed.view(-1)[:10].tolist() == [0, 1, 8, 9, 16, 17, 24, 25, 2, 3]


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_reference_matmul_equals_float64_dequantized_product(g: int, sign: str) -> None:
    k, n = 576, 192
    codes, scales = _random(k, n, g, seed=11, sign=sign)
    qweight, packed, shape = fmt.pack(codes, scales, g)
    a = torch.randn(5, shape.k_pad, generator=torch.Generator().manual_seed(5))
    a[:, k:] = 0
    w64 = _dense64(codes, scales, g)
    want = a[:, :k].double() @ w64
    got = fmt.reference_matmul(a, qweight, packed, g)
    assert got.shape == (5, shape.n_pad)
    assert torch.allclose(got[:, :n].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[:, n:]) == 0  # padded columns contribute nothing
    # fp16 scales times q - 8 in -8..7 are exact in float32: the dequantized weight is the definition itself.
    assert torch.equal(fmt.dequantize(qweight, packed, g)[:k, :n].double(), w64)


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("k,n,g", [(576, 192, 64), (576, 1536, 32), (1536, 576, 128), (100, 70, -1)])
def test_marlin_linear_cpu_product_equals_float64_product(k: int, n: int, g: int, sign: str) -> None:
    """The layer the loader builds (``MarlinLinear.from_codes``, [N, K] orientation), on the CPU path:
    y = x @ ((q - 8) * s)^T + bias against a float64 computation, with padding and signed scales."""
    codes, scales = _random(k, n, g, seed=3 * k + n, sign=sign)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(n, generator=gen).half()
    layer = MarlinLinear.from_codes(codes.T.to(torch.uint8), scales.T.float(), g, bias=bias).float()
    x = torch.randn(3, 4, k, generator=gen)
    want = x.double() @ _dense64(codes, scales, g) + bias.double()
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (3, 4, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(layer.dense_weight(torch.float64, torch.device("cpu"))[:k, :n], _dense64(codes, scales, g))
    # The same layer with every scale's sign flipped computes -y (+ bias): the sign is not lost anywhere.
    flipped = MarlinLinear.from_codes(codes.T.to(torch.uint8), -scales.T.float(), g, bias=bias).float()
    with torch.no_grad():
        torch.testing.assert_close((flipped(x) - bias.float()).double(), -(want - bias.double()), rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))


def test_padding_contributes_zero_even_with_nonzero_activations() -> None:
    codes, scales = _random(100, 70, 32, seed=1)
    qweight, packed, shape = fmt.pack(codes, scales, 32)
    dense = fmt.dequantize(qweight, packed, 32)
    assert torch.count_nonzero(dense[100:]) == 0 and torch.count_nonzero(dense[:, 70:]) == 0


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="group size 96"):
        fmt.padded_shape(576, 192, 96)
    with pytest.raises(ValueError, match="0..15"):
        fmt.pack(torch.full((64, 64), 16), torch.ones(1, 64, dtype=torch.float16), -1)
    with pytest.raises(ValueError, match="scales must be"):
        fmt.pack(torch.full((64, 64), 8), torch.ones(2, 64, dtype=torch.float16), -1)
