"""Block-wise tuning of rounding and scales by signed gradient descent, from a given 4-bit solution.

SignRound (Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs", the algorithm of Intel's AutoRound): every quantized linear of a decoder block gets a rounding offset
V [N, K] in [-1/2, 1/2] and a scale multiplier A [N, G], its weights become

    Wq = (s * A) * clamp(round(W / (s * A) + V), -8, 7)        (round: straight-through gradient)

and V, A descend along the sign of the gradient of the block's output error

    || block(X_q; Wq) - block(X_fp; W) ||^2

on calibration samples: X_q are the block's inputs in the quantized model (the blocks before it already
quantized), X_fp the unquantized model's, so the block also learns to undo the error it receives. The step
decays linearly to zero. Started here from the importance-weighted signed solution
(:func:`gptq.solver.weighted_rtn_quantize`), not from plain round to nearest, so a few dozen steps do what the
paper does in hundreds; V = 0 and A = 1 reproduce the start exactly. The tuned solution is always kept (no
check against the start on held-back samples).

The signed scales of the start may be negative; A multiplies them, so the sign never changes.
This module has no I/O and no dependency on transformers or the CLI: ``block`` is any module whose forward
takes (hidden, **kwargs) and whose listed linears hold ``weight`` [N, K].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from gptq.quantizer import MAXQ, ZERO


@dataclass(frozen=True)
class TuneConfig:
    """How long and how far the tuning goes.

    Attributes:
        steps: signed-gradient steps per block.
        samples: calibration samples per step (each a whole sequence).
        lr: the first step of V (then decaying linearly to 0): total travel at most ``lr * steps / 2``.
        lr_scale: the first step of A.
        scale_range: (lowest, highest) multiplier A of a group's starting scale.
    """

    steps: int = 12
    samples: int = 8
    lr: float = 0.04
    lr_scale: float = 0.01
    scale_range: tuple[float, float] = (0.8, 1.2)


def _expand(scales: torch.Tensor, k: int) -> torch.Tensor:
    """[N, G] -> [N, K]: each group's value repeated over its columns (the last group may be partial)."""
    per = -(-k // scales.shape[1])
    return scales.repeat_interleave(per, dim=1)[:, :k]


class BlockTuner:
    """Tunes the quantized linears of one block from a starting solution (codes are not needed: the start is
    ``round(W / s)``, which is what the importance-weighted solution is).

    Args:
        block: the decoder block, holding the original weights (they are not modified).
        start: {linear name within the block: scales float32 [N, G] of the starting solution}.
        cfg: :class:`TuneConfig`.
        weights: {name: W [N, K]} to quantize, where the block's own are a narrower copy (default: the block's).
    """

    def __init__(self, block: nn.Module, start: dict[str, torch.Tensor], cfg: TuneConfig,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
        self.block = block
        self.cfg = cfg
        self.names = list(start)
        weights = weights or {}
        self.weights = {n: (weights[n] if n in weights else block.get_submodule(n).weight).detach().to(torch.float32)
                        for n in self.names}
        self.scales = {n: s.to(torch.float32) for n, s in start.items()}
        self.v = {n: torch.zeros_like(self.weights[n], requires_grad=True) for n in self.names}
        self.a = {n: torch.ones_like(self.scales[n], requires_grad=True) for n in self.names}
        self.step_index = 0
        # Only V and A learn: the block's own parameters (norms) need no gradient, which halves the backward.
        self._frozen = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)

    def _quantized(self, name: str) -> torch.Tensor:
        w = self.weights[name]
        s = _expand(self.scales[name] * self.a[name], w.shape[1])
        x = w / s + self.v[name]
        q = x + (torch.round(x) - x).detach()  # straight-through rounding
        return torch.clamp(q, -ZERO, MAXQ - ZERO) * s

    def loss(self, hidden: torch.Tensor, kwargs: dict, target: torch.Tensor, valid: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
        """Mean squared error of the block's output with the current Wq against ``target`` (float32 scalar).

        Args:
            hidden: [B, L, D] the block's inputs in the quantized model; target: [B, L, D] the unquantized
            model's outputs; valid: bool [B, L] real tokens (None: all); dtype: the compute dtype.
        """
        weights = {f"{n}.weight": self._quantized(n).to(dtype) for n in self.names}
        out = functional_call(self.block, weights, (hidden,), kwargs)
        out = out[0] if isinstance(out, tuple) else out
        diff = (out.to(torch.float32) - target.to(torch.float32)).square()
        if valid is not None:
            return diff[valid].mean()
        return diff.mean()

    def step(self, losses: list[torch.Tensor]) -> None:
        """One signed-gradient step on the summed ``losses`` (each from :meth:`loss`)."""
        for n in self.names:
            self.v[n].grad = None
            self.a[n].grad = None
        torch.stack(losses).sum().backward()
        frac = 1.0 - self.step_index / self.cfg.steps
        lo, hi = self.cfg.scale_range
        with torch.no_grad():
            for n in self.names:
                self.v[n].sub_(self.cfg.lr * frac * torch.sign(self.v[n].grad)).clamp_(-0.5, 0.5)
                self.a[n].sub_(self.cfg.lr_scale * frac * torch.sign(self.a[n].grad)).clamp_(lo, hi)
        self.step_index += 1

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (codes uint8 [N, K], scales float32 [N, G] fp16-representable)} of the tuned solution (the
        block's parameters get their ``requires_grad`` back)."""
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        out = {}
        with torch.no_grad():
            for n in self.names:
                w = self.weights[n]
                s = (self.scales[n] * self.a[n]).to(torch.float16).to(torch.float32)
                s = torch.where(s != 0, s, self.scales[n])
                q = torch.clamp(torch.round(w / _expand(s, w.shape[1]) + self.v[n]), -ZERO, MAXQ - ZERO)
                out[n] = ((q + ZERO).to(torch.uint8), s)
        return out


__all__ = ["BlockTuner", "TuneConfig"]
