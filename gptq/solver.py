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

from gptq.quantizer import (
    DEFAULT_SEARCH,
    MAXQ,
    ZERO,
    clip_search_scales,
    dequant,
    quantize_codes,
    row_scales,
    search_factors,
    search_scales,
)


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
        signed: choose each group's scale among both signs by :func:`gptq.quantizer.search_scales` (GPTQ's
            error metric, least-squares refits) instead of the unsigned clipping search.
        search: ``(lowest factor, count)`` of the signed search (:func:`gptq.quantizer.search_factors`).
    """

    group_size: int = 128
    damp: float = DEFAULT_DAMP
    blocksize: int = 128
    clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.75
    damp_retries: int = 4
    signed: bool = False
    search: tuple[float, int] = DEFAULT_SEARCH


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

    ``total`` (X^T X; the name both accumulators give their running sum, which several ranks all-reduce) is
    float32 [K, K] on ``device`` (half the memory of float64: 3.3 GB instead of 6.6 GB for a 70B down_proj,
    K = 28672). Each batch's X^T X is one GEMM, then added to it. On a GPU, inputs
    that arrive in fp16/bf16 (the model dtype) are multiplied with TF32 tensor cores: TF32 keeps 10 mantissa
    bits, so an fp16 or bf16 value converts to it exactly and every product is exact; only the float32
    accumulation rounds, as it did before. Summing the float32 batch products in float32 instead of float64 changes H by
    about 1e-7 relative per batch (tens of batches: ~1e-6), far below the damping (0.1 x mean diag) that
    the solver adds, and the built-in model's quality figures do not move (docs/scale.md).
    """

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros((k, k), dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` [..., K] (any float dtype); no host synchronisation."""
        exact_tf32 = x.dtype in (torch.float16, torch.bfloat16) and self.total.is_cuda
        x = x.reshape(-1, x.shape[-1]).to(self.total.device, torch.float32)
        self.tokens += x.shape[0]
        # The batch's product first, then one addition (not addmm_, whose GEMM may fold the running sum into
        # its K-blocked accumulation): so a sum over ranks of per-rank sums equals the one-process sum whenever
        # the order of the terms is the same up to commutation (tests/test_distributed.py).
        if exact_tf32:
            with _tf32_matmul():
                self.total += x.T @ x
        else:
            self.total += x.T @ x

    def finalize(self) -> torch.Tensor:
        """H as float32 [K, K]."""
        if self.tokens == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.total * (2.0 / self.tokens)


class ImportanceAccumulator:
    """Mean squared input per feature, ``E[x_j^2]`` over calibration tokens: the diagonal of H up to a factor 2,
    at the cost of one pass over the inputs (no K x K product). ``total`` (the sum of x_j^2) is float32 [K] on
    ``device``; each batch is squared in float32 and summed, so a sum over ranks equals the one-process sum up to
    the order of terms."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(k, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` [..., K] (any float dtype); no host synchronisation."""
        x = x.reshape(-1, x.shape[-1]).to(self.total.device, torch.float32)
        self.tokens += x.shape[0]
        self.total += x.square().sum(dim=0)

    def finalize(self) -> torch.Tensor:
        """float32 [K] mean squared input per feature."""
        if self.tokens == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.total / self.tokens


class _tf32_matmul:  # noqa: N801 - used as a context manager
    """Allow TF32 for float32 CUDA matmuls inside the block (restored after)."""

    def __enter__(self) -> None:
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.prev


@dataclass
class PreparedHessian:
    """What GPTQ needs from H, computed once and shared by every linear that reads the same inputs.

    Attributes:
        u: float32 [K, K] upper Cholesky factor of (H + damping)^-1.
        dead: bool [K] inputs that never fired (their weights are zeroed).
        damp: damping fraction used; retries: times it was raised.
        diag: float32 [K] the diagonal of H (dead inputs 1): the per-feature importance.
    """

    u: torch.Tensor
    dead: torch.Tensor
    damp: float
    retries: int
    diag: torch.Tensor | None = None


def prepare_hessian(h: torch.Tensor, cfg: GPTQConfig) -> PreparedHessian:
    """Fix dead inputs and factor H for :func:`gptq_quantize`. Raises :class:`CholeskyError`."""
    h = h.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h.diagonal().masked_fill_(dead, 1.0)  # = h[dead, dead] = 1, without the boolean-index host sync
    u, damp, retries = inverse_cholesky(h, cfg.damp, cfg.damp_retries)
    return PreparedHessian(u, dead, damp, retries, torch.diag(h).clone())


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
    """Quantize W [N, K] (any float dtype) given H float32 [K, K] or its :class:`PreparedHessian`.

    Rows are independent (each row's rounding errors only move that row's later columns), so linears that
    share one Hessian can be quantized as one matrix of stacked rows. The column loop works on the
    transposed block [B, N] (a column is a contiguous row there) with nine tensor operations per column and
    no host synchronisation: on a GPU the whole solve is queued without round trips.
    """
    n, k = w.shape
    g = k if cfg.group_size == -1 else cfg.group_size
    if cfg.blocksize % g and cfg.group_size != -1:
        raise ValueError(f"blocksize {cfg.blocksize} must be a multiple of group size {g}")
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(h, cfg)
    u, damp_used, retries = prep.u, prep.damp, prep.retries
    w = w.to(torch.float32).clone()
    w.masked_fill_(prep.dead.unsqueeze(0), 0.0)  # dead inputs: = w[:, dead] = 0, without a host sync

    codes = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    qweight = torch.empty_like(w)
    scales: list[torch.Tensor] = []
    factors = search_factors(*cfg.search, device=w.device) if cfg.signed else None
    scale_t = None
    if cfg.group_size == -1:  # one scale per row, chosen up front
        scale_t = row_scales(w) if factors is None else search_scales(w, factors, importance=prep.diag)
        scale_t = scale_t.view(1, n)
        scales.append(scale_t.view(n, 1))
    diag = torch.diagonal(u).clone()  # [K]
    for b0 in range(0, k, cfg.blocksize):
        b1 = min(b0 + cfg.blocksize, k)
        wt = w[:, b0:b1].T.contiguous()  # [B, N]: row i is column b0 + i
        u1 = u[b0:b1, b0:b1]
        qt = torch.empty_like(wt)  # [B, N] signed codes q - 8, in -8..7
        st = torch.empty_like(wt)  # [B, N] the scale each column used
        errt = torch.empty_like(wt)  # [B, N]
        for i in range(b1 - b0):
            col = b0 + i
            if cfg.group_size != -1 and col % g == 0:
                gw = wt[i : i + g].T  # [N, g]
                if factors is not None:
                    ub = u1[i : i + g, i : i + g]
                    u_inv = torch.linalg.solve_triangular(ub, torch.eye(ub.shape[0], device=w.device), upper=True)
                    s = search_scales(gw, factors, u_inv=u_inv)
                elif cfg.clip:
                    s = clip_search_scales(gw, u1[i : i + g, i : i + g], cfg.clip_grid, cfg.clip_max_shrink)
                else:
                    s = row_scales(gw)
                scales.append(s)
                scale_t = s.view(1, n)
            assert scale_t is not None
            x = wt[i]
            q = torch.clamp(torch.round(x / scale_t[0]), -ZERO, MAXQ - ZERO)
            st[i] = scale_t[0]
            qt[i] = q
            errt[i] = (x - q * scale_t[0]) / diag[col]
            wt[i:].addr_(u1[i, i:], errt[i], alpha=-1.0)
        codes[:, b0:b1] = (qt + ZERO).T.to(torch.uint8)
        qweight[:, b0:b1] = (qt * st).T
        w[:, b1:] -= errt.T @ u[b0:b1, b1:]
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


def weighted_rtn_quantize(w: torch.Tensor, importance: torch.Tensor, cfg: GPTQConfig) -> QuantizedMatrix:
    """The fast method: round to nearest on signed scales searched against an importance per input feature.

    Each group's scale is :func:`gptq.quantizer.search_scales` with ``importance`` (the mean squared input of
    each feature on the calibration data, i.e. the diagonal of the layer's Hessian up to a factor): the error
    that matters is the output's, ``sum_j E[x_j^2] (w_j - q_j s)^2`` when inputs are uncorrelated. No error
    feedback between columns, so no Hessian, no Cholesky, and every group of every row is searched at once.

    Args:
        w: [N, K] weights (any float dtype).
        importance: float32 [K], non-negative (a feature that never fired weighs 0).
        cfg: group size and search range (``cfg.search``); the other fields are GPTQ's.

    Returns:
        A :class:`QuantizedMatrix` (codes uint8 [N, K], scales float32 [N, G], weight float32 [N, K]).
    """
    n, k = w.shape
    g = k if cfg.group_size == -1 else cfg.group_size
    groups = -(-k // g)
    pad = groups * g - k
    w32 = torch.nn.functional.pad(w.to(torch.float32), (0, pad)).view(n * groups, g)  # zeros code exactly
    imp = torch.nn.functional.pad(importance.to(torch.float32), (0, pad)).view(1, groups, g)
    imp = imp.expand(n, groups, g).reshape(n * groups, g)
    factors = search_factors(*cfg.search, device=w32.device)
    s = search_scales(w32, factors, importance=imp)  # [N * G, 1]
    q = torch.clamp(torch.round(w32 / s), -ZERO, MAXQ - ZERO)
    qw = (q * s).view(n, groups * g)[:, :k]
    codes = (q + ZERO).to(torch.uint8).view(n, groups * g)[:, :k].contiguous()
    return QuantizedMatrix(codes, s.view(n, groups), qw.contiguous())


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the layer's output error relative to its output energy on calibration data."""
    return float(relative_output_error_tensor(w, wq, h))


def relative_output_error_tensor(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """:func:`relative_output_error` as a 0-dim float32 tensor on the device (no host synchronisation). With
    ``h`` float32 [K] (a diagonal: the importance E[x^2]) the ratio of ``sum(h * dW^2)`` to ``sum(h * W^2)``."""
    w = w.to(torch.float32)
    d = w - wq.to(torch.float32)
    if h.dim() == 1:
        num = (d.square() * h).sum()
        den = (w.square() * h).sum()
    elif h.is_cuda:  # a report, not a decision: TF32 (relative error ~1e-3 of a ratio) at tensor-core speed
        with _tf32_matmul():
            num = ((d @ h) * d).sum()
            den = ((w @ h) * w).sum()
    else:
        num = ((d @ h) * d).sum()
        den = ((w @ h) * w).sum()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(num))


__all__ = [
    "ZERO",
    "CholeskyError",
    "GPTQConfig",
    "HessianAccumulator",
    "ImportanceAccumulator",
    "PreparedHessian",
    "prepare_hessian",
    "QuantizedMatrix",
    "gptq_quantize",
    "inverse_cholesky",
    "relative_output_error",
    "relative_output_error_tensor",
    "rtn_quantize",
    "weighted_rtn_quantize",
]
