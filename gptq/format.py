"""The Marlin weight format: how 4-bit codes and scales are laid out for the kernel. The one place it is defined.

Notation. A linear layer computes ``y = x @ W.T`` with ``W`` of shape [N, K] (N = out_features, K =
in_features). The kernel multiplies by ``B = W.T`` of shape [K, N]. Quantization is symmetric 4-bit:

    code q[k, n] in 0..15,      B[k, n] = (q[k, n] - 8) * s[k // g, n]

with one scale per group of ``g`` consecutive input rows and output column (``g = -1``: one per column).
A scale may be negative (signed scales: the group's larger-magnitude side on code 0, ``q - 8 = -8``); nothing in
this layout depends on the sign, which packing, unpacking and :func:`dequantize` keep as it is.

Padding. The kernel works on K % 64 == 0 and N % 64 == 0 with ``g`` dividing K. Other shapes are padded:
``K_pad = round_up(K, lcm(64, g))``, ``N_pad = round_up(N, 64)``; padded entries get code 8 and scale 1,
so they contribute exactly zero. The original (K, N) is stored beside the packed tensors.

Layout of ``qweight`` (int32 [K_pad / 16, 2 * N_pad]):

1. B is cut into 16x16 tiles. Row ``r`` of the tiled matrix holds the tiles of rows 16r..16r+15 in
   column order, each tile as its 256 codes, so the tiled matrix is [K/16, 16 * N].
2. Every run of 4 consecutive tiles (a 16 x 64 strip, 1024 codes) is reordered so that lane ``t`` of a
   warp finds, as 32 consecutive codes (one 16-byte load), its ``mma.sync.m16n8k16`` B fragments of the 4
   tiles: for tile j = 0..3, for half h = 0, 1 (columns 0-7 or 8-15 of the tile), for k in
   (2(t%4), 2(t%4)+1, 2(t%4)+8, 2(t%4)+9) the code at (k, t//4 + 8h).
3. Each run of 8 codes goes into one int32, nibble ``p`` (bits 4p..4p+3) holding code number
   ``[0, 2, 4, 6, 1, 3, 5, 7][p]``, so that masking with 0x000F000F yields a pair of adjacent-k codes in
   the two fp16 halves (the LOP3 dequantization trick).

Layout of ``scales`` ([K_pad / g, N_pad], or [1, N_pad] per channel; same dtype as the activations):
within every run of 64 columns (grouped) the columns are taken in the order ``8 * j + i`` for
i = 0..7, j = 0..7; per channel, within every run of 32 columns, in the order ``2i + j`` for i = 0..3,
j in (0, 1, 8, 9, 16, 17, 24, 25). This matches the order in which lanes consume the scales.

This is the layout of IST-DASLab's Marlin (2024), which vLLM's Marlin kernels also consume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

TILE = 16
"""Side of the square tiles the codes are cut into (one mma k-step)."""
K_ALIGN = 64
"""K must be a multiple of this (and of the group size) for the kernel."""
N_ALIGN = 64
"""N must be a multiple of this for the kernel (4 tiles of 16 columns per 16-byte lane load)."""
ZERO_CODE = 8
"""The code that dequantizes to exactly 0: symmetric 4-bit uses q - 8."""
MAX_CODE = 15
_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class PackedShape:
    """Original and padded sizes of one packed matrix.

    Attributes:
        k: in_features of the original layer.
        n: out_features of the original layer.
        group_size: rows per scale group, or -1 for one scale per output column.
        k_pad: K after padding (multiple of 64 and of group_size).
        n_pad: N after padding (multiple of 64).
    """

    k: int
    n: int
    group_size: int
    k_pad: int
    n_pad: int

    @property
    def num_groups(self) -> int:
        """Rows of the scale tensor: K_pad / g, or 1 per channel."""
        return 1 if self.group_size == -1 else self.k_pad // self.group_size


GROUP_SIZES = (32, 64, 128, -1)
"""The group sizes the kernel supports (-1: one scale per output column). Python's one declaration of them:
the CLI's choices, the settings' validation and the format checks all read this tuple."""


def check_group_size(group_size: int) -> None:
    """Raise ValueError unless ``group_size`` is one the kernel supports (:data:`GROUP_SIZES`)."""
    if group_size not in GROUP_SIZES:
        sizes = ", ".join(str(g) for g in GROUP_SIZES[:-1])
        raise ValueError(f"group size {group_size} is not supported: use {sizes} or -1 (per channel)")


def padded_shape(k: int, n: int, group_size: int) -> PackedShape:
    """Return the padded shape of a [K, N] matrix quantized with ``group_size``.

    Example: the built-in model's k_proj has K=576, N=192: with g=128 it pads to K_pad=640, N_pad=192.
    """
    check_group_size(group_size)
    if k <= 0 or n <= 0:
        raise ValueError(f"matrix shape must be positive, got K={k}, N={n}")
    k_align = K_ALIGN if group_size == -1 else math.lcm(K_ALIGN, group_size)
    return PackedShape(k, n, group_size, _round_up(k, k_align), _round_up(n, N_ALIGN))


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@cache
def _tile_strip_perm() -> torch.Tensor:
    """Index map for one 16x64 strip: packed position -> position in the 4 concatenated row-major tiles.

    Returns int64 [1024]; ``packed = strip[perm]``. Cached: it is a constant of the format.
    """
    order = []
    for lane in range(32):
        col = lane // 4
        k0 = 2 * (lane % 4)
        for tile in range(4):
            run = []
            for half in (0, 1):
                for k in (k0, k0 + 1, k0 + 8, k0 + 9):
                    run.append(tile * TILE * TILE + k * TILE + col + 8 * half)
            order.extend(run[p] for p in _NIBBLE_ORDER)
    perm = torch.tensor(order, dtype=torch.int64)
    assert sorted(order) == list(range(1024))
    return perm


@cache
def _scale_perm(per_channel: bool) -> torch.Tensor:
    """Column order of the scales within each run of 64 (grouped) or 32 (per-channel) columns."""
    if per_channel:
        order = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    else:
        order = [8 * j + i for i in range(8) for j in range(8)]
    return torch.tensor(order, dtype=torch.int64)


def pad_codes_and_scales(
    codes: torch.Tensor, scales: torch.Tensor, shape: PackedShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad codes [K, N] and scales [K/g or 1, N] to [K_pad, N_pad] / [num_groups, N_pad]."""
    out_codes = torch.full((shape.k_pad, shape.n_pad), ZERO_CODE, dtype=torch.int32, device=codes.device)
    out_codes[: shape.k, : shape.n] = codes.to(torch.int32)
    out_scales = torch.ones((shape.num_groups, shape.n_pad), dtype=scales.dtype, device=scales.device)
    out_scales[: scales.shape[0], : shape.n] = scales
    return out_codes, out_scales


def pack(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, PackedShape]:
    """Pack 4-bit codes and their scales into the Marlin layout.

    Args:
        codes: integer tensor [K, N] with values in 0..15 (B = W.T orientation: rows are input features).
        scales: float tensor [ceil(K / g), N] (or [1, N] when ``group_size == -1``), fp16 or bf16.
        group_size: 32, 64, 128, or -1 (per channel).

    Returns:
        qweight int32 [K_pad / 16, 2 * N_pad], packed scales [K_pad / g or 1, N_pad] (dtype of ``scales``),
        and the :class:`PackedShape`.
    """
    if codes.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"codes and scales must be 2-D, got {tuple(codes.shape)} and {tuple(scales.shape)}")
    k, n = codes.shape
    shape = padded_shape(k, n, group_size)
    expected_groups = 1 if group_size == -1 else math.ceil(k / group_size)
    if tuple(scales.shape) != (expected_groups, n):
        raise ValueError(f"scales must be [{expected_groups}, {n}] for codes [{k}, {n}] and group size "
                         f"{group_size}, got {list(scales.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > MAX_CODE):
        raise ValueError("codes must lie in 0..15")
    codes, scales = pad_codes_and_scales(codes, scales, shape)
    kp, np_ = shape.k_pad, shape.n_pad
    # 1. tiles: [K/16, 16, N/16, 16] -> [K/16, N/16, 16, 16] -> rows of 16*N codes.
    tiled = codes.reshape(kp // TILE, TILE, np_ // TILE, TILE).permute(0, 2, 1, 3).reshape(kp // TILE, -1)
    # 2. lane order within each 16x64 strip (includes the nibble interleave).
    perm = _tile_strip_perm().to(codes.device)
    tiled = tiled.reshape(-1, perm.numel())[:, perm].reshape(kp // TILE, -1)
    # 3. eight codes per int32, nibble p at bits 4p.
    nibbles = tiled.reshape(kp // TILE, -1, 8).to(torch.int64)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (nibbles << shifts).sum(dim=-1)
    qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return qweight.contiguous(), _permute_scales(scales, group_size).contiguous(), shape


def _permute_scales(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    perm = _scale_perm(group_size == -1).to(scales.device)
    return scales.reshape(-1, perm.numel())[:, perm].reshape(scales.shape)


def _unpermute_scales(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    perm = _scale_perm(group_size == -1).to(scales.device)
    inv = torch.argsort(perm)
    return scales.reshape(-1, perm.numel())[:, inv].reshape(scales.shape)


def unpack_padded(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`pack` without removing padding.

    Args:
        qweight: int32 [K_pad / 16, 2 * N_pad].
        scales: packed scales [K_pad / g or 1, N_pad].

    Returns:
        codes int32 [K_pad, N_pad] in 0..15 and scales [K_pad / g or 1, N_pad] in natural column order.
    """
    check_group_size(group_size)
    if qweight.dim() != 2 or qweight.dtype != torch.int32 or qweight.shape[1] % (2 * N_ALIGN):
        raise ValueError(f"qweight must be int32 [K_pad/16, 2*N_pad], got {qweight.dtype} {list(qweight.shape)}")
    kp, np_ = qweight.shape[0] * TILE, qweight.shape[1] // 2
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift is fine after masking
    tiled = nibbles.reshape(kp // TILE, -1)
    perm = _tile_strip_perm().to(qweight.device)
    inv = torch.argsort(perm)
    tiled = tiled.reshape(-1, perm.numel())[:, inv].reshape(kp // TILE, -1)
    codes = tiled.reshape(kp // TILE, np_ // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(kp, np_)
    return codes.contiguous(), _unpermute_scales(scales, group_size)


def unpack(
    qweight: torch.Tensor, scales: torch.Tensor, shape: PackedShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`pack`: codes int32 [K, N] and scales [ceil(K / g) or 1, N], padding removed."""
    codes, nat_scales = unpack_padded(qweight, scales, shape.group_size)
    groups = 1 if shape.group_size == -1 else math.ceil(shape.k / shape.group_size)
    return codes[: shape.k, : shape.n].contiguous(), nat_scales[:groups, : shape.n].contiguous()


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense padded B = dequant(qweight) as ``dtype`` [K_pad, N_pad]: ``(q - 8) * s``, computed in float32."""
    codes, nat_scales = unpack_padded(qweight, scales, group_size)
    kp = codes.shape[0]
    rows_per_scale = kp if group_size == -1 else group_size
    s = nat_scales.to(torch.float32).repeat_interleave(rows_per_scale, dim=0)
    return ((codes.to(torch.float32) - ZERO_CODE) * s).to(dtype)


def reference_matmul(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernel's product computed plainly: ``a @ dequant(B)`` with float32 accumulation.

    Args:
        a: activations [..., K_pad], any float dtype.
        qweight: int32 [K_pad / 16, 2 * N_pad] in the Marlin layout.
        scales: packed scales [K_pad / g or 1, N_pad].
        group_size: 32, 64, 128 or -1.

    Returns:
        [..., N_pad] in ``a.dtype``.
    """
    b = dequantize(qweight, scales, group_size, torch.float32)
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"a has K={a.shape[-1]} but qweight packs K_pad={b.shape[0]}")
    return (a.to(torch.float32) @ b).to(a.dtype)
