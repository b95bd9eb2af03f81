"""The records that pass between the pipeline and a checkpoint format (see :mod:`marlin_cli.formats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LinearShape:
    """A linear that is about to be quantized: its full name and ``nn.Linear`` features (W is [out, in])."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear as the quantizer hands it to a format.

    Attributes:
        name: full module name, e.g. ``model.layers.0.self_attn.q_proj``.
        codes: uint8 [N, K] in 0..15 (N = out_features, K = in_features); ``W = (q - 8) * s``.
        scales: float32 [N, G], G = ceil(K / group_size), or 1 when ``group_size == -1``.
        group_size: input features per scale (one of ``gptq.format.GROUP_SIZES``).
    """

    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int


@dataclass(frozen=True)
class PackedLinear:
    """A quantized linear read back already in the Marlin kernel's layout (``gptq/format.py``).

    Attributes:
        qweight: int32 [K_pad / 16, 2 * N_pad]; scales: [K_pad / g or 1, N_pad] (fp16 as stored).
        in_features, out_features: the layer's shape before padding.
    """

    name: str
    qweight: torch.Tensor
    scales: torch.Tensor
    in_features: int
    out_features: int
    group_size: int


@dataclass(frozen=True)
class CodesLinear:
    """A quantized linear read back as codes and scales, which the loader packs for the kernel.

    Attributes:
        codes: integer [N, K] in 0..15, ``W = (q - 8) * s`` (symmetric; a format with other zero points
            converts or refuses).
        scales: float [N, G].
        g_idx: optional int [K], the group of each input feature; ``None`` or ``arange(K) // g`` are the
            plain layout, anything else (act-order) is refused by the loader.
    """

    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    g_idx: torch.Tensor | None = None


class TensorSource(Protocol):
    """Tensor-at-a-time access to a checkpoint folder (:class:`marlin_cli.pipeline.weights.WeightStore`)."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...
