"""The records that pass between the pipeline and a checkpoint format (see :mod:`marlin_cli.formats`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from marlin_cli.errors import MarlinError


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
        scales: float32 [N, G], G = ceil(K / group_size), or 1 when ``group_size == -1``; any sign (a negative
            scale puts the group's larger-magnitude side, positive, on code 0).
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
        scales: float [N, G], any sign, as stored.
        g_idx: optional int [K], the group of each input feature; ``None`` or ``arange(K) // g`` are the
            plain layout; anything else must come sorted, with :attr:`perm` (a reader sorts act-order
            layers, so ``g_idx`` is informational).
    """

    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    g_idx: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    """Act-order: int64 [K] with ``codes[:, j]`` = original input column ``perm[j]`` (columns already sorted
    into their groups, ``j // g``); the layer computes ``y = x[..., perm] @ W_sorted^T``. None: no reordering."""


class TensorSource(Protocol):
    """Tensor-at-a-time access to a checkpoint folder (:class:`marlin_cli.pipeline.weights.WeightStore`)."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...

    def names(self) -> list[str]: ...


def layer_names(source: TensorSource, suffix: str) -> list[str]:
    """Modules of ``source`` that hold a tensor ``<module>.<suffix>``, in storage order."""
    tail = "." + suffix
    return [name[: -len(tail)] for name in source.names() if name.endswith(tail)]


Decode = Callable[[dict[str, torch.Tensor], str, Any], tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]
"""``decode(tensors, layer, scheme) -> (codes [N, K], scales [N, G], perm or None)`` of one layer."""


def read_codes(source: TensorSource, qc: dict, *, label: str, marker: str, layer_tensors: tuple[str, ...],
               parse_config: Callable[[dict, str], Any], decode: Decode) -> Iterator[CodesLinear]:
    """The ``read`` of a format that stores codes + scales per layer (compressed-tensors, GPTQ).

    Parses ``qc`` with ``parse_config(qc, where)`` (a scheme with ``group_size``), finds the layers by their
    ``<layer>.<marker>`` tensor, hands each layer's tensors among ``layer_tensors`` to ``decode`` and yields a
    :class:`CodesLinear` per layer, in storage order. A MarlinError naming ``label`` when no layer is found."""
    where = f"{getattr(source, 'model_dir', 'checkpoint')}/config.json"
    scheme = parse_config(qc, where)
    layers = layer_names(source, marker)
    if not layers:
        raise MarlinError(f"{where} says {label}, but no tensor is named '<layer>.{marker}'")
    for layer in layers:
        tensors = {key: source.get(f"{layer}.{key}") for key in layer_tensors if f"{layer}.{key}" in source}
        codes, scales, perm = decode(tensors, layer, scheme)
        yield CodesLinear(layer, codes, scales, scheme.group_size, perm=perm)


def summarize(problems: list[str], hint: str) -> list[str]:
    """``"layer: reason"`` lines -> one line per distinct reason naming its layers (4, then a count), then ``hint``.

    What a format's ``check`` returns: short enough to read, and it still names every kind of problem."""
    by_reason: dict[str, list[str]] = {}
    for line in problems:
        layer, _, reason = line.partition(": ")
        by_reason.setdefault(reason, []).append(layer)
    out = []
    for reason, layers in by_reason.items():
        more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
        out.append(f"{reason} in {len(layers)} linear(s) ({', '.join(layers[:4])}{more})")
    return [*out, hint] if out else []


VLLM_MARLIN_MIN_N = 64
VLLM_MARLIN_MIN_K = 128
"""vLLM's ``check_marlin_supports_shape`` (``marlin_utils.py``): ``output_size_per_partition % 64 == 0`` and
``input_size_per_partition % 128 == 0`` (GPTQ_MARLIN_MIN_THREAD_N / _K), else its Marlin kernel is not used."""


def vllm_marlin_warning(shapes: list[LinearShape], fmt_name: str) -> str | None:
    """A one-line warning naming the linears that vLLM's Marlin kernel will not take (None if all fit).

    Without tensor parallelism; with it, vLLM checks the per-GPU slices (N / tp for q/k/v/gate/up, K / tp for
    o/down), so larger tp can only add layers to this list."""
    bad = [s for s in shapes if s.out_features % VLLM_MARLIN_MIN_N or s.in_features % VLLM_MARLIN_MIN_K]
    if not bad:
        return None
    first = bad[0]
    return (f"warning: {len(bad)} of {len(shapes)} linears (e.g. {first.name}, K = {first.in_features}, "
            f"N = {first.out_features}) do not meet vLLM's Marlin shape rule (N % {VLLM_MARLIN_MIN_N} == 0 and "
            f"K % {VLLM_MARLIN_MIN_K} == 0, vLLM marlin_utils.check_marlin_supports_shape): vLLM will serve this "
            f"{fmt_name} checkpoint with another kernel (e.g. Machete, Exllama, or its fallback) or refuse it; "
            "this tool's own loader runs every shape")
