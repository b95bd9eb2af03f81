"""The Marlin checkpoint format: the kernel's packed layout, as a Hugging Face model folder.

A checkpoint is a Hugging Face model folder (written by :class:`marlin_cli.formats.folder.CheckpointWriter`):
- ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``): for each
  quantized linear ``<name>.qweight`` int32 [K_pad/16, 2*N_pad], ``<name>.scales`` fp16 [K_pad/g or 1, N_pad],
  ``<name>.shape`` int32 [2] (in, out features before padding), ``<name>.bias`` if any (layout in
  gptq/format.py; scales of either sign); every other tensor (embeddings, norms, lm_head, unquantized projections) in fp16.
- ``config.json`` with ``quantization_config`` (see :func:`quantization_config`), tokenizer files,
  ``generation_config.json`` when the source had one, and ``marlin_run.json``, the record of the run.

This module is the Marlin codec of the :mod:`marlin_cli.formats` interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from gptq import format as fmt
from marlin_cli.errors import MarlinError
from marlin_cli.formats.base import LinearShape, PackedLinear, QuantizedLinear, TensorSource

if TYPE_CHECKING:  # settings imports the format registry, which imports this module
    from marlin_cli.settings import QuantSettings

NAME = "marlin"
QUANT_METHOD = "marlin"
FORMAT_VERSION = 1


def check(shapes: Sequence[LinearShape], group_size: int) -> list[str]:
    """Problems with these linears in the Marlin format: none for a supported group size (any shape is padded)."""
    try:
        fmt.check_group_size(group_size)
    except ValueError as err:
        return [str(err)]
    return [f"{s.name}: shape [{s.out_features}, {s.in_features}] is empty" for s in shapes
            if s.in_features <= 0 or s.out_features <= 0]


def encode(linear: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``<name>.qweight``, ``<name>.scales`` (fp16) and ``<name>.shape`` for one quantized linear."""
    qweight, scales, shape = fmt.pack(linear.codes.T.contiguous(), linear.scales.T.contiguous().to(torch.float16),
                                      linear.group_size)
    return {f"{linear.name}.qweight": qweight, f"{linear.name}.scales": scales,
            f"{linear.name}.shape": torch.tensor([shape.k, shape.n], dtype=torch.int32)}


def quantization_config(settings: QuantSettings, modules: Sequence[str]) -> dict:
    """The ``quantization_config`` entry of config.json: the format's keys, then every setting of the run.

    Args:
        settings: the run's resolved settings (``method`` is "gptq" or "rtn"; ``marlin pack`` sets "pack").
        modules: full names of the quantized linears (everything else is fp16).
    """
    return {**settings.to_dict(), "quant_method": QUANT_METHOD, "format": NAME, "format_version": FORMAT_VERSION,
            "sym": settings.symmetric, "desc_act": settings.act_order, "zero_point": 8,
            "method": settings.method, "modules": sorted(modules)}


def recognizes(qc: dict) -> bool:
    """True for a Marlin ``quantization_config``; a MarlinError if it is newer than this tool reads."""
    if qc.get("quant_method") != QUANT_METHOD:
        return False
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise MarlinError(f"this checkpoint uses Marlin format version {qc['format_version']}, newer than this "
                          f"tool's {FORMAT_VERSION}; upgrade marlin")
    return True


def read(source: TensorSource, qc: dict) -> Iterator[PackedLinear]:
    """The packed tensors of every quantized linear named in ``qc["modules"]``."""
    for name in qc["modules"]:
        shape_name = f"{name}.shape"
        if shape_name not in source:
            raise MarlinError(f"the checkpoint lacks {shape_name}; it is incomplete or not Marlin format")
        k, n = (int(v) for v in source.get(shape_name))
        yield PackedLinear(name, source.get(f"{name}.qweight"), source.get(f"{name}.scales"), k, n, qc["group_size"])

