"""Layer-by-layer quantization of a decoder: each layer is loaded, quantized and released in turn.

The inputs of decoder layer 0 are captured for every calibration sample; then for layer i: load its
weights from the shards, accumulate each linear's Hessian from the layer's real inputs, quantize (GPTQ or
round-to-nearest), recompute the layer's outputs with the quantized weights and feed them to layer i + 1.
Peak memory is one decoder layer plus the calibration activations, never the whole model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

from gptq.solver import (
    CholeskyError,
    GPTQConfig,
    HessianAccumulator,
    QuantizedMatrix,
    gptq_quantize,
    relative_output_error,
    rtn_quantize,
)
from marlin_cli.errors import MarlinError
from marlin_cli.models import ArchSpec, rebuild_rotary
from marlin_cli.weights import WeightStore


@dataclass
class LayerReport:
    """What happened to one linear: its relative output error on calibration data and the damping used."""

    name: str
    shape: tuple[int, int]
    rel_error: float
    damp: float
    retries: int
    seconds: float


@dataclass
class SequentialResult:
    """Quantized linears by full name (codes [N, K] uint8, scales [N, G] float32), plus per-linear reports."""

    matrices: dict[str, QuantizedMatrix] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


def _layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def capture_layer0_inputs(
    model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor], device: str
) -> list[tuple[torch.Tensor, dict]]:
    """Run the model's stem (embeddings, masks, rotary) on each sample and record layer 0's (hidden, kwargs)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        base = model.get_submodule("model")
        for ids in samples:
            with suppress(_StopForward):
                base(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@contextmanager
def _hessian_hooks(layer: nn.Module, names: tuple[str, ...], device: str) -> Iterator[dict[str, HessianAccumulator]]:
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for name in names:
        lin = layer.get_submodule(name)
        accs[name] = HessianAccumulator(lin.in_features, device)

        def hook(_m: nn.Module, inp: tuple, _out: torch.Tensor, acc: HessianAccumulator = accs[name]) -> None:
            acc.add(inp[0].detach())

        handles.append(lin.register_forward_hook(hook))
    try:
        yield accs
    finally:
        for h in handles:
            h.remove()


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    return [_layer_output(layer(hidden, **kwargs)) for hidden, kwargs in inputs]


def quantize_sequential(
    model: nn.Module,
    store: WeightStore,
    spec: ArchSpec,
    samples: list[torch.Tensor],
    cfg: GPTQConfig,
    *,
    nearest: bool = False,
    true_sequential: bool = False,
    skip: tuple[str, ...] = (),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_layer: Callable[[int, int, list[LayerReport]], None] | None = None,
) -> SequentialResult:
    """Quantize every decoder layer of a meta-device ``model`` whose weights live in ``store``.

    Args:
        model: a transformers causal LM built on the meta device (see :func:`marlin_cli.models.meta_model`).
        store: the source model's tensors.
        spec: architecture names (layers, rotary, sequential groups).
        samples: calibration token ids, each [1, L].
        cfg: GPTQ settings (group size, damping, clipping).
        nearest: round to nearest instead of GPTQ (the Hessians are still collected for the error report).
        true_sequential: quantize the groups of spec.sequential one after another within each layer.
        skip: linear names within a layer to leave unquantized (e.g. k/v for --skip-gq).
        device: where layers run; dtype: their compute dtype.
        on_layer: called after each decoder layer with (index, count, reports of that layer).

    Returns:
        A :class:`SequentialResult` keyed by full linear names (e.g. ``model.layers.0.mlp.up_proj``).
    """
    layers: nn.ModuleList = model.get_submodule(spec.layers)
    # The stem: everything outside the decoder layers (embeddings, final norm, rotary) comes to the device.
    stem = {n.rpartition(".")[0] for n in store.names()
            if not n.startswith((spec.layers + ".", "lm_head."))}
    for prefix in sorted(stem):
        store.materialize(model, prefix, device, dtype)
    rebuild_rotary(model, spec, device)
    inputs = capture_layer0_inputs(model, layers, samples, device)
    groups = spec.sequential if true_sequential else (spec.linears,)
    result = SequentialResult()
    for i, layer in enumerate(layers):
        prefix = f"{spec.layers}.{i}"
        store.materialize(model, prefix, device, dtype)
        layer_reports: list[LayerReport] = []
        with torch.no_grad():
            for group in groups:
                todo = tuple(n for n in group if n not in skip)
                if not todo:
                    continue
                with _hessian_hooks(layer, todo, device) as accs:
                    _run_layer(layer, inputs)
                for name in todo:
                    lin = layer.get_submodule(name)
                    t0 = time.perf_counter()
                    h = accs[name].finalize()
                    w = lin.weight.data
                    full = f"{prefix}.{name}"
                    try:
                        qm = rtn_quantize(w, cfg.group_size) if nearest else gptq_quantize(w, h, cfg)
                    except CholeskyError as err:
                        raise MarlinError(f"{full}: {err}") from err
                    lin.weight.data = qm.weight.to(w.dtype)
                    qm.weight = torch.empty(0)  # the dequantized copy is not needed past this point
                    result.matrices[full] = QuantizedMatrix(qm.codes.cpu(), qm.scales.cpu(), qm.weight, qm.damp, qm.retries)
                    layer_reports.append(LayerReport(full, (lin.out_features, lin.in_features),
                                                     relative_output_error(w, lin.weight.data, h),
                                                     qm.damp, qm.retries, time.perf_counter() - t0))
                    del h
            outputs = _run_layer(layer, inputs)
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs, strict=True)]
        layers[i] = layer.to("meta")
        result.reports.extend(layer_reports)
        if on_layer is not None:
            on_layer(i, len(layers), layer_reports)
    return result
