"""Checkpoint formats: one module per format on disk, all behind one small interface.

A format module (``marlin_cli/formats/<name>.py``) is a codec: it turns the quantizer's result into the
tensors and ``quantization_config`` of its format, and reads them back. It does no file I/O of its own
(the pipeline writes through :class:`marlin_cli.formats.folder.CheckpointWriter` and reads through a
:class:`TensorSource`, e.g. :class:`marlin_cli.pipeline.weights.WeightStore`). It defines, at module level:

``NAME: str``
    The format's name: the value of ``QuantSettings.format`` (``--format``), e.g. ``"marlin"``.

``check(shapes: Sequence[LinearShape], group_size: int) -> list[str]``
    Problems that would stop this format from holding these quantized linears (one human sentence each,
    naming the linear); ``[]`` when all is well. The pipeline calls it before any calibration or
    quantization work and turns a non-empty list into one :class:`MarlinError`.

``encode(linear: QuantizedLinear) -> dict[str, torch.Tensor]``
    The tensors to write for one quantized linear, by full tensor name (``f"{linear.name}.qweight"``...).
    ``linear.codes`` is uint8 [N, K] in 0..15 with ``W = (q - 8) * s``; ``linear.scales`` float32 [N, G]
    (G = ceil(K / g), or 1 when ``group_size == -1``) of either sign: a negative scale (issue 18's signed
    grid) is written as it is, never as its absolute value. The bias (if any) and every unquantized tensor
    are written by the pipeline in fp16 under their own names; ``encode`` returns only the linear's own.

``quantization_config(settings: QuantSettings, modules: Sequence[str]) -> dict``
    The ``quantization_config`` entry of the checkpoint's config.json, from the run's settings and the
    full names of the quantized linears (everything else is fp16).

``check`` of compressed-tensors and GPTQ also returns what to do (a group size that works, ``--format marlin``).

``recognizes(qc: dict) -> bool``
    Whether a config.json's ``quantization_config`` belongs to this format (the loader asks every
    registered format in turn).

``read(source: TensorSource, qc: dict) -> Iterator[PackedLinear | CodesLinear]``
    Per quantized linear of the checkpoint: either the Marlin-packed tensors (:class:`PackedLinear`,
    loaded as they are) or codes + scales (+ optional ``g_idx``) in the layer's orientation
    (:class:`CodesLinear`, which the loader repacks with :meth:`gptq.linear.MarlinLinear.from_codes`).
    Raise :class:`MarlinError` for a checkpoint this tool cannot serve (e.g. asymmetric zero points).
    Act-order layers come sorted into their groups with :attr:`CodesLinear.perm` (the loader gathers the
    activation columns at run time, as vLLM's gptq_marlin does).

A new format plugs in by adding its module to :data:`FORMATS` below; ``QuantSettings`` accepts every
name in :data:`FORMATS`, ``marlin quantize`` writes with it, and ``marlin_cli.loading`` reads with it.
"""

from __future__ import annotations

from types import ModuleType

from marlin_cli.formats import compressed_tensors, gptq, marlin
from marlin_cli.formats.base import CodesLinear, LinearShape, PackedLinear, QuantizedLinear, TensorSource

FORMATS: dict[str, ModuleType] = {compressed_tensors.NAME: compressed_tensors, gptq.NAME: gptq, marlin.NAME: marlin}
"""Every format this tool writes and reads, by name (the first is ``marlin quantize``'s default)."""

__all__ = ["FORMATS", "CodesLinear", "LinearShape", "PackedLinear", "QuantizedLinear", "TensorSource", "compressed_tensors", "gptq",
           "marlin"]
