"""Symmetric 4-bit grid: scales, codes, round-to-nearest, and the Hessian-weighted group grid clipping search.

The grid is the one the Marlin kernel dequantizes: ``w ~ (q - 8) * s`` with q in 0..15, i.e. the values
-8 s .. 7 s. The scale of a row is the smallest that covers it: ``s = max(-min(w) / 8, max(w) / 7)``, so
its most negative weight lands on -8 s or its most positive on 7 s exactly. (GPTQ's usual ``2 max|w| / 15``
puts a negative extreme at -16/15 of itself and cuts a positive one to 14/15: on the built-in model that
costs 4% perplexity in round-to-nearest g64 on the whole botchan stream, 43.46 vs 41.71.) Clipping shrinks this scale by a
factor p. Scales are rounded to fp16 here, before codes are chosen, so that the codes are the best ones for
the scales the kernel will actually read.
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
    # Chunk over p so that the [chunk, R, g] temporaries stay in cache on a CPU (about 4 MB each); on a GPU
    # the launch count matters instead, so temporaries of up to 256 MB (a 70B down_proj group: ~17 shrinks of
    # 75 per chunk, 5 chunks instead of 75). No host synchronisation either way.
    budget = (1 << 26) if w.is_cuda else (1 << 20)
    chunk = max(1, min(steps, budget // max(1, w.numel())))
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
