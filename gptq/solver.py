"""GPTQ for one weight matrix (Frantar et al., 2022, "GPTQ", Sec. 3, Algorithm 1) with Marlin's group grid clipping.

Given a linear layer's weight W [N, K] and the Hessian of its reconstruction loss H = 2 X X^T / T
[K, K] (X the layer's inputs, T tokens), columns are quantized left to right; each column's rounding
error is spread onto the not-yet-quantized columns through the upper Cholesky factor U of H^-1, in
blocks of ``blocksize`` columns (lazy batch updates). Scales are chosen once per group of ``group_size``
columns, when the group's first column is reached, on the error-updated weights; with ``clip`` they are
chosen by :func:`gptq.quantizer.clip_search_scales` (the Hessian-weighted error), else the smallest scale covering the group (see :func:`gptq.quantizer.row_scales`).

Tiny example of the block/group structure, K = 8, blocksize = 4, group_size = 2::

    columns   0 1 | 2 3 || 4 5 | 6 7        "|" group boundary, "||" block boundary
    scales chosen at columns 0, 2, 4, 6; errors of 0..3 reach 4..7 once, at the end of block 0.

This module has no I/O and no dependency on transformers or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq.quantizer import ZERO, clip_search_scales, dequant, quantize_codes, row_scales


class CholeskyError(RuntimeError):
    """H (after every damping retry) is not positive definite; the message says what to change."""


DEFAULT_DAMP = 0.1
"""Hessian damping as a fraction of mean(diag H): GPTQ's reference code (Frantar et al., 2022) and IST-DASLab's
Marlin use 0.1. The one declaration of it; ``marlin_cli.settings.QuantSettings`` takes its default from here."""


@dataclass(frozen=True)
class GPTQConfig:
    """How to quantize one matrix.

    Attributes:
        group_size: columns (input features) per scale; -1 = one scale per row (per channel).
        damp: dampening added to H's diagonal, as a fraction of its mean (:data:`DEFAULT_DAMP`).
        blocksize: columns per lazy-update block (a multiple of group_size).
        clip: group grid clipping (ignored per channel, as in the original).
        clip_grid: steps per unit of shrink in the clipping search.
        clip_max_shrink: largest fraction of the scale the clipping may remove.
        damp_retries: times the damping is multiplied by 10 when the Cholesky factorization fails.
    """

    group_size: int = 128
    damp: float = DEFAULT_DAMP
    blocksize: int = 128
    clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.75
    damp_retries: int = 4


@dataclass
class QuantizedMatrix:
    """The result for one matrix, in the layer's own orientation.

    Attributes:
        codes: uint8 [N, K], values 0..15.
        scales: float32 [N, G] (G = ceil(K / group_size), or 1 per channel), fp16-representable.
        weight: float32 [N, K], the dequantized weights ``(codes - 8) * scales``.
        damp: the damping fraction finally used.
        retries: how many times the damping had to be raised.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    weight: torch.Tensor
    damp: float = 0.0
    retries: int = 0


class HessianAccumulator:
    """H = 2 X X^T / T over calibration inputs, every token weighted equally.

    Products are computed in float32 (the costly part) and summed in float64 on ``device``.
    """

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros((k, k), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` [..., K] (any float dtype)."""
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float32)
        self.tokens += x.shape[0]
        self.xtx += (x.T @ x).to(torch.float64)

    def finalize(self) -> torch.Tensor:
        """H as float32 [K, K]."""
        if self.tokens == 0:
            raise ValueError("no calibration inputs reached this layer")
        return (self.xtx * (2.0 / self.tokens)).to(torch.float32)


@dataclass
class PreparedHessian:
    """What GPTQ needs from H, computed once and shared by every linear that reads the same inputs.

    Attributes:
        u: float32 [K, K] upper Cholesky factor of (H + damping)^-1.
        dead: bool [K] inputs that never fired (their weights are zeroed).
        damp: damping fraction used; retries: times it was raised.
    """

    u: torch.Tensor
    dead: torch.Tensor
    damp: float
    retries: int


def prepare_hessian(h: torch.Tensor, cfg: GPTQConfig) -> PreparedHessian:
    """Fix dead inputs and factor H for :func:`gptq_quantize`. Raises :class:`CholeskyError`."""
    h = h.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    u, damp, retries = inverse_cholesky(h, cfg.damp, cfg.damp_retries)
    return PreparedHessian(u, dead, damp, retries)


def inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, raising the damping on failure.

    Args:
        h: float32 [K, K], dead columns (zero diagonal) already fixed.

    Returns:
        (U float32 [K, K], damping fraction used, number of retries).
    """
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    h64 = h.to(torch.float64)
    for attempt in range(retries + 1):
        frac = damp * (10**attempt)
        chol, info = torch.linalg.cholesky_ex(h64 + frac * mean_diag * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return u.to(torch.float32), frac, attempt
    raise CholeskyError(
        f"the Hessian is not positive definite even with damping {frac:g} x mean(diag H): use more "
        "calibration samples or longer sequences, or raise --damp"
    )


def gptq_quantize(w: torch.Tensor, h: torch.Tensor | PreparedHessian, cfg: GPTQConfig) -> QuantizedMatrix:
    """Quantize W [N, K] (any float dtype) given H float32 [K, K] or its :class:`PreparedHessian`."""
    n, k = w.shape
    g = k if cfg.group_size == -1 else cfg.group_size
    if cfg.blocksize % g and cfg.group_size != -1:
        raise ValueError(f"blocksize {cfg.blocksize} must be a multiple of group size {g}")
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(h, cfg)
    u, damp_used, retries = prep.u, prep.damp, prep.retries
    w = w.to(torch.float32).clone()
    w[:, prep.dead] = 0.0

    codes = torch.zeros((n, k), dtype=torch.uint8, device=w.device)
    qweight = torch.zeros_like(w)
    scales: list[torch.Tensor] = []
    scale = row_scales(w) if cfg.group_size == -1 else None
    if scale is not None:
        scales.append(scale)
    for b0 in range(0, k, cfg.blocksize):
        b1 = min(b0 + cfg.blocksize, k)
        w1 = w[:, b0:b1].clone()
        u1 = u[b0:b1, b0:b1]
        err1 = torch.zeros_like(w1)
        for i in range(b1 - b0):
            col = b0 + i
            if cfg.group_size != -1 and col % g == 0:
                gw = w1[:, i : i + g]
                scale = clip_search_scales(gw, u1[i : i + g, i : i + g], cfg.clip_grid, cfg.clip_max_shrink) \
                    if cfg.clip else row_scales(gw)
                scales.append(scale)
            assert scale is not None
            q = quantize_codes(w1[:, i : i + 1], scale)
            dq = dequant(q, scale)
            codes[:, col] = q.squeeze(1).to(torch.uint8)
            qweight[:, col] = dq.squeeze(1)
            e = (w1[:, i : i + 1] - dq) / u1[i, i]
            w1[:, i:] -= e @ u1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    return QuantizedMatrix(codes, torch.cat(scales, dim=1), qweight, damp_used, retries)


def rtn_quantize(w: torch.Tensor, group_size: int) -> QuantizedMatrix:
    """Round-to-nearest baseline: per group the smallest covering scale, no error feedback, no clipping. W [N, K]."""
    n, k = w.shape
    w = w.to(torch.float32)
    g = k if group_size == -1 else group_size
    codes, qw, scales = [], [], []
    for c0 in range(0, k, g):
        block = w[:, c0 : c0 + g]
        s = row_scales(block)
        q = quantize_codes(block, s)
        codes.append(q.to(torch.uint8))
        qw.append(dequant(q, s))
        scales.append(s)
    return QuantizedMatrix(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(qw, 1))


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the layer's output error relative to its output energy on calibration data."""
    w = w.to(torch.float32)
    d = w - wq.to(torch.float32)
    num = ((d @ h) * d).sum().item()
    den = ((w @ h) * w).sum().item()
    return num / den if den > 0 else 0.0


__all__ = [
    "ZERO",
    "CholeskyError",
    "GPTQConfig",
    "HessianAccumulator",
    "PreparedHessian",
    "prepare_hessian",
    "QuantizedMatrix",
    "gptq_quantize",
    "inverse_cholesky",
    "relative_output_error",
    "rtn_quantize",
]
