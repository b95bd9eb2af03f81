"""Symmetric 4-bit grid: scales, codes, round-to-nearest, and the Hessian-weighted group grid clipping search.

The grid is the one the Marlin kernel dequantizes: ``w ~ (q - 8) * s`` with q in 0..15, i.e. the values
-8 s .. 7 s. The scale of a row is the smallest that covers it: ``s = max(-min(w) / 8, max(w) / 7)``, so
its most negative weight lands on -8 s or its most positive on 7 s exactly. (GPTQ's usual ``2 max|w| / 15``
puts a negative extreme at -16/15 of itself and cuts a positive one to 14/15: on the built-in model that
costs 4% perplexity in round-to-nearest g64 on the whole botchan stream, 43.46 vs 41.71.) Clipping shrinks this scale by a
factor p. Scales are rounded to fp16 here, before codes are chosen, so that the codes are the best ones for
the scales the kernel will actually read.

Signed scales (:func:`signed_scale_candidates`, :func:`search_scales`): the kernel multiplies by ``s`` whatever
its sign, so a group may take a negative scale. With ``s = -a / 8`` (``a`` the group's largest-magnitude
weight, with its sign) the larger-magnitude side of the group gets the 16th level: ``a`` lands on
``q - 8 = -8`` whichever its sign, and the step is ``max|w| / 8`` instead of ``max|w| / 7`` when the extreme is
positive. The candidates are searched against an error metric (an importance per input feature, or GPTQ's
metric ``||delta @ inv(U_FF)||^2``) and each is refitted by least squares for its codes: the scheme of
llama.cpp's importance-matrix quantization and of AutoRound's "optimized RTN" (Cheng et al., 2023), written
here for the Marlin grid.
"""

from __future__ import annotations

import torch

MAXQ = 15
"""Largest 4-bit code."""
ZERO = 8
"""Code of the value 0 (symmetric grid)."""


def row_scales(w: torch.Tensor, shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-row scales of a weight block.

    Args:
        w: float32 [..., R, C] weights (rows = output features).
        shrink: clip factor p, a float or a float32 tensor broadcastable to [..., R, 1].

    Returns:
        float32 [..., R, 1] scales ``p * max(-min(w) / 8, max(w) / 7)``, rounded to fp16 and never zero (an
        all-zero row gets scale 1, which codes it exactly as 8s).
    """
    neg = torch.clamp(-w.amin(dim=-1, keepdim=True), min=0) / ZERO  # -8 s reaches the most negative weight
    pos = torch.clamp(w.amax(dim=-1, keepdim=True), min=0) / (MAXQ - ZERO)  # 7 s reaches the most positive
    s = (torch.maximum(neg, pos) * shrink).to(torch.float16).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes ``clamp(round(w / s) + 8, 0, 15)`` as float32 (same shape as ``w``)."""
    return torch.clamp(torch.round(w / scale) + ZERO, 0, MAXQ)


def dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(q - 8) * s`` in float32."""
    return (codes - ZERO) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round ``w`` to the nearest grid point of ``scale`` and return the dequantized value (float32)."""
    return dequant(quantize_codes(w, scale), scale)


def temporary_elements(w: torch.Tensor) -> int:
    """float32 elements of one candidate-search temporary on ``w``'s device (the scale searches chunk by it).

    On a GPU the launch count matters: 2^26 (256 MB; a 70B down_proj group's clip search runs in 5 chunks
    instead of 75). On a CPU the temporaries should stay in cache: 2^18 (1 MB). Measured on the 2-core CPU
    machine (groups of 64, 576-13824 rows): 2^18 runs the signed search 1.2-4x and the clip search 1.7x faster
    than 2^20.
    """
    return (1 << 26) if w.is_cuda else (1 << 18)


def clip_search_scales(
    w: torch.Tensor, u_block: torch.Tensor, grid: int = 100, max_shrink: float = 0.75
) -> torch.Tensor:
    """Group grid clipping: per row, the shrink of the row's scale that minimises the Hessian-weighted error.

    For a group of columns F about to be quantized, GPTQ's error after optimally updating the remaining
    columns is ``delta @ inv(H^-1_FF) @ delta.T`` per row, and ``H^-1_FF = U_FF.T @ U_FF`` with U the upper
    Cholesky factor of H^-1, so the error is ``||delta @ inv(U_FF)||^2``. Each p in 1.00, 0.99, ... (grid
    steps, down to 1 - max_shrink + 1/grid) is tried and the best per row kept.

    Args:
        w: float32 [R, g] current (error-updated) weights of the group.
        u_block: float32 [g, g] the group's diagonal block of the upper Cholesky factor of H^-1.
        grid: number of steps per unit shrink.
        max_shrink: largest fraction of the scale removed.

    Returns:
        float32 [R, 1] scales (fp16-representable).
    """
    steps = int(max_shrink * grid)
    shrinks = 1.0 - torch.arange(steps, dtype=torch.float32, device=w.device) / grid  # [P]
    u_inv = torch.linalg.solve_triangular(u_block, torch.eye(u_block.shape[0], device=w.device), upper=True)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale = row_scales(w)
    # Chunked over p: [chunk, R, g] temporaries of at most temporary_elements(). No host synchronisation.
    chunk = max(1, min(steps, temporary_elements(w) // max(1, w.numel())))
    for start in range(0, steps, chunk):
        p = shrinks[start : start + chunk].view(-1, 1, 1)
        scale = row_scales(w.unsqueeze(0), p)  # [P, R, 1]
        delta = w.unsqueeze(0) - fake_quantize(w.unsqueeze(0), scale)  # [P, R, g]
        err = (delta @ u_inv).square().sum(dim=-1)  # [P, R]
        err_min, idx = err.min(dim=0)
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        chosen = scale.squeeze(-1).gather(0, idx.unsqueeze(0)).squeeze(0)  # [R]
        best_scale = torch.where(better.unsqueeze(-1), chosen.unsqueeze(-1), best_scale)
    return best_scale


DEFAULT_SEARCH = (0.70, 16)
"""Scale search: ``(lowest factor, number of factors)``, the factors p = 1.00, 0.98, ..., 0.70 of each sign's
covering scale. Measured on the built-in model (docs/quality.md): below 0.70 nothing is ever chosen at 4 bits."""


def search_factors(lowest: float = DEFAULT_SEARCH[0], count: int = DEFAULT_SEARCH[1],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [count] factors ``1 .. lowest`` evenly spaced, largest first (so that ties keep the covering
    scale); ``[1.0]`` when ``count == 1``."""
    if count == 1:
        return torch.ones(1, device=device)
    return torch.linspace(1.0, lowest, count, device=device)


def signed_scale_candidates(w: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Both signs of scale for each shrink factor, rounded to fp16 and never zero.

    Args:
        w: float32 [R, g] a group of weights (rows = output features).
        factors: float32 [P] shrink factors p (1 = the scale that covers the extreme).

    Returns:
        float32 [2P, R, 1]: ``-p a / 8`` (the extreme ``a`` on level -8: the signed grid) then ``p a / 7`` (the
        extreme on level +7: the grid of :func:`row_scales`, which covers the other side more finely).
    """
    a = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))  # [R, 1] the signed extreme
    p = factors.view(-1, 1, 1)
    s = torch.cat([-a.unsqueeze(0) * p / ZERO, a.unsqueeze(0) * p / (MAXQ - ZERO)])
    s = s.to(torch.float16).to(torch.float32)
    return torch.where(s != 0, s, torch.ones_like(s))


def _metric_error(delta: torch.Tensor, importance: torch.Tensor | None, u_inv: torch.Tensor | None) -> torch.Tensor:
    """Error of ``delta`` [..., R, g] per row: ``sum(importance * delta^2)`` or ``||delta @ u_inv||^2``."""
    if u_inv is not None:
        return (delta @ u_inv).square().sum(dim=-1)
    if importance is not None:
        return (delta.square() * importance).sum(dim=-1)
    return delta.square().sum(dim=-1)


def search_scales(
    w: torch.Tensor,
    factors: torch.Tensor,
    importance: torch.Tensor | None = None,
    u_inv: torch.Tensor | None = None,
    refit: bool = True,
) -> torch.Tensor:
    """Per row, the signed scale of least weighted error among :func:`signed_scale_candidates` and their refits.

    For each candidate s the codes are ``round(w / s)`` clamped to -8..7; its refit is the least-squares
    scale for those codes under the metric, ``s* = <w, q>_M / <q, q>_M`` (rounded to fp16), re-rounded and
    kept where it is better. The metric is ``sum_j d_j delta_j^2`` with ``importance`` d (the mean squared
    input of each feature: the diagonal of the layer's Hessian), or GPTQ's ``||delta @ u_inv||^2`` with
    ``u_inv`` [g, g] the inverse of the group's block of the upper Cholesky factor of H^-1 (the error after the
    remaining columns are optimally updated), or plain squared error when both are None.

    Args:
        w: float32 [R, g] weights of one group (or of many groups, one per row, with a per-row importance).
        factors: float32 [P] see :func:`search_factors`.
        importance: float32 [g] (shared by the rows) or [R, g], or None.
        u_inv: float32 [g, g] or None.
        refit: also try the least-squares refit of every candidate.

    Returns:
        float32 [R, 1] scales, fp16-representable, nonzero, of either sign.
    """
    # All candidates of a block of rows at once: temporaries [2P, rows, g] of at most temporary_elements(). No
    # host synchronisation.
    rows = max(1, temporary_elements(w) // (2 * factors.numel() * w.shape[1]))
    per_row = importance is not None and importance.dim() == 2
    out = [
        _search_rows(w[r : r + rows], factors, importance[r : r + rows] if per_row else importance, u_inv, refit)
        for r in range(0, w.shape[0], rows)
    ]
    return out[0] if len(out) == 1 else torch.cat(out)


def _search_rows(
    w: torch.Tensor, factors: torch.Tensor, importance: torch.Tensor | None, u_inv: torch.Tensor | None, refit: bool
) -> torch.Tensor:
    """:func:`search_scales` for one block of rows, every candidate at once."""
    s = signed_scale_candidates(w, factors)  # [C, r, 1]
    if refit:
        q = torch.clamp(torch.round(w / s), -ZERO, MAXQ - ZERO)
        if u_inv is not None:
            wm, qm = w @ u_inv, q @ u_inv
            num, den = (wm * qm).sum(-1, keepdim=True), qm.square().sum(-1, keepdim=True)
        else:
            qw = q if importance is None else q * importance
            num, den = (qw * w).sum(-1, keepdim=True), (qw * q).sum(-1, keepdim=True)
        fit = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), s)
        fit = fit.to(torch.float16).to(torch.float32)
        s = torch.cat([s, torch.where(fit != 0, fit, s)])  # [2C, r, 1]
    delta = w - torch.clamp(torch.round(w / s), -ZERO, MAXQ - ZERO) * s
    err = _metric_error(delta, importance, u_inv)  # [C', r]
    idx = err.argmin(dim=0)  # the first of equal errors: the covering scale before its shrinks
    return s.squeeze(-1).gather(0, idx.unsqueeze(0)).view(-1, 1)
