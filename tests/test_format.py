"""The Marlin format: exact round trips, the documented lane/nibble layout, padding, and the reference product."""

from __future__ import annotations

import pytest
import torch

from gptq import format as fmt


def _random(k: int, n: int, g: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g == -1 else -(-k // g)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).half()
    return codes, scales


@pytest.mark.parametrize("k,n,g", [(64, 64, 32), (576, 192, 128), (576, 1536, 64), (1536, 576, -1), (96, 80, 32),
                                   (16, 8, -1), (4096, 128, 128)])
def test_pack_unpack_round_trip(k: int, n: int, g: int) -> None:
    codes, scales = _random(k, n, g, seed=k + n)
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


@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_reference_matmul_equals_float64_dequantized_product(g: int) -> None:
    k, n = 576, 192
    codes, scales = _random(k, n, g, seed=11)
    qweight, packed, shape = fmt.pack(codes, scales, g)
    a = torch.randn(5, shape.k_pad, generator=torch.Generator().manual_seed(5))
    a[:, k:] = 0
    per = k if g == -1 else g
    w64 = (codes.double() - 8) * scales.double().repeat_interleave(per, 0)[:k]
    want = a[:, :k].double() @ w64
    got = fmt.reference_matmul(a, qweight, packed, g)
    assert got.shape == (5, shape.n_pad)
    assert torch.allclose(got[:, :n].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[:, n:]) == 0  # padded columns contribute nothing


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
