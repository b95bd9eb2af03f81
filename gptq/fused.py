"""Several :class:`gptq.linear.MarlinLinear` that read the same input, computed as one Marlin matmul.

q/k/v (or gate/up) of a decoder layer multiply the same activations by three (two) weights. Their packed
weights concatenate along the output dimension: the Marlin layout (16x64 strips of 16x16 tiles) and the
scale permutation are both local to each 64-column strip, and every part's N_pad is a multiple of 64, so
``torch.cat([qweight_i], 1)`` and ``torch.cat([scales_i], 1)`` are exactly the packing of the concatenated
matrix. One kernel launch then reads the input once and fills every part's columns; the parts are views of
the fused output at their padded offsets. The parts must share K_pad, the group size, the scale dtype and
the act-order permutation (or have none).

On the CPU (or any non-CUDA tensor) the fused layer takes MarlinLinear's reference path on the
concatenated dequantized weight, so the same code runs in CPU tests.
"""

from __future__ import annotations

import torch
from torch import nn

from gptq.linear import MarlinLinear


def fusion_key(layer: MarlinLinear) -> tuple:
    """What must be equal for two layers to fuse: (K_pad, in_features, group size, scale dtype, device, perm).

    The permutation enters as a tuple of its values (act-order layers fuse only with the same order).
    """
    perm = None if layer.perm is None else tuple(layer.perm.tolist())
    return (layer.packed.k_pad, layer.in_features, layer.group_size, layer.scales.dtype, layer.qweight.device, perm)


def can_fuse(layers: list[MarlinLinear]) -> bool:
    """True when ``layers`` (two or more MarlinLinear) share :func:`fusion_key`."""
    if len(layers) < 2 or not all(isinstance(layer, MarlinLinear) for layer in layers):
        return False
    first = fusion_key(layers[0])
    return all(fusion_key(layer) == first for layer in layers[1:])


class FusedMarlinLinear(nn.Module):
    """One MarlinLinear holding the concatenation of ``parts``; :meth:`forward` returns every part's output.

    Attributes:
        fused: MarlinLinear with in_features = the parts' in_features and out_features = sum of their N_pad
            (no column padding of its own); bias [sum N_pad] (zeros in padding columns) when any part has one.
        offsets: start column of each part in the fused output (its padded offset).
        out_features: each part's out_features.
    """

    def __init__(self, parts: list[MarlinLinear]) -> None:
        super().__init__()
        if not can_fuse(parts):
            raise ValueError("layers fuse only when two or more MarlinLinear share K_pad, in_features, group size, "
                             "scale dtype, device and act-order permutation: "
                             + "; ".join(repr(fusion_key(p)[:5]) for p in parts if isinstance(p, MarlinLinear)))
        first = parts[0]
        n_pads = [p.packed.n_pad for p in parts]
        self.out_features = tuple(p.out_features for p in parts)
        self.offsets = tuple(sum(n_pads[:i]) for i in range(len(parts)))
        has_bias = any(p.bias is not None for p in parts)
        device = first.qweight.device
        fused = MarlinLinear(first.in_features, sum(n_pads), first.group_size, bias=has_bias, device="meta",
                             dtype=first.scales.dtype)
        assert fused.packed.n_pad == sum(n_pads) and fused.packed.k_pad == first.packed.k_pad
        fused.qweight = torch.cat([p.qweight for p in parts], 1)  # [K_pad / 16, 2 * sum N_pad] int32
        fused.scales = torch.cat([p.scales for p in parts], 1)  # [groups, sum N_pad]
        fused.shape = torch.tensor([first.in_features, sum(n_pads)], dtype=torch.int32, device=device)
        if has_bias:
            bias = torch.zeros(sum(n_pads), dtype=first.scales.dtype, device=device)
            for p, off in zip(parts, self.offsets, strict=True):
                if p.bias is not None:
                    bias[off: off + p.out_features] = p.bias.to(bias.dtype)
            fused.bias = bias
        if first.perm is not None:
            fused.register_buffer("perm", first.perm.clone())
        self.fused = fused

    @property
    def in_features(self) -> int:
        """The shared input width."""
        return self.fused.in_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in_features] -> one tensor per part, [..., out_features_i] in x.dtype.

        The outputs are views of one [..., sum N_pad] result (not contiguous when there are several parts).
        """
        y = self.fused(x)
        return tuple(y[..., off: off + n] for off, n in zip(self.offsets, self.out_features, strict=True))

    def extra_repr(self) -> str:
        return f"parts={len(self.offsets)}, out_features={self.out_features}, offsets={self.offsets}"
