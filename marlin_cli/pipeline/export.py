"""The last step of ``marlin quantize`` and ``marlin pack``: quantized linears + the source's other tensors ->
the tensors of a checkpoint, in the chosen format, handed to the folder writer."""

from __future__ import annotations

from types import ModuleType

import torch

from marlin_cli.formats import QuantizedLinear
from marlin_cli.formats.folder import CheckpointWriter
from marlin_cli.pipeline.weights import WeightStore


def write_tensors(writer: CheckpointWriter, store: WeightStore, matrices: dict, group_size: int,
                  codec: ModuleType) -> None:
    """Copy every source tensor into ``writer``: quantized linears as ``codec`` encodes them, the rest as fp16.

    Args:
        matrices: full linear name -> object with ``codes`` uint8 [N, K] (0..15) and ``scales`` [N, G].
        codec: a format module of :data:`marlin_cli.formats.FORMATS` (its ``encode``).
    """
    for name in store.names():
        module, _, leaf = name.rpartition(".")
        if module in matrices and leaf == "weight":
            qm = matrices[module]
            for key, tensor in codec.encode(QuantizedLinear(module, qm.codes, qm.scales, group_size)).items():
                writer.add(key, tensor)
            continue
        tensor = store.get(name)
        writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)
