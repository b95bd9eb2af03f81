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
    prepare_hessian,
    relative_output_error,
    rtn_quantize,
)
from marlin_cli.errors import MarlinError
from marlin_cli.pipeline.models import ArchSpec, rebuild_rotary
from marlin_cli.pipeline.weights import WeightStore


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
    """Raised by a hook once what a pass needs is recorded (the rest of the forward is skipped)."""


#: Calibration samples are run in right-padded batches of at most this many (padded) tokens: large matrix
#: products run at several times the speed of per-sample ones on a CPU. Causal attention means the real
#: tokens never see the padding after them, so their activations are those of a per-sample forward.
BATCH_TOKENS = 8192


@dataclass
class CalibrationBatch:
    """Inputs of the current decoder layer for a batch of samples.

    Attributes:
        hidden: [B, L, D] hidden states (rows past a sample's length are padding).
        kwargs: the other arguments the decoder layer takes (position embeddings, masks...).
        valid: bool [B, L], True at real tokens.
    """

    hidden: torch.Tensor
    kwargs: dict
    valid: torch.Tensor


def batch_samples(samples: list[torch.Tensor], budget: int = BATCH_TOKENS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group samples (each [1, L_i] token ids) into right-padded batches of at most ``budget`` padded tokens.

    Samples are sorted by length (longest first) so that padding is small. Returns (ids [B, L], valid [B, L]).
    """
    order = sorted(samples, key=lambda t: t.shape[-1], reverse=True)
    batches: list[list[torch.Tensor]] = []
    for ids in order:
        if batches and (len(batches[-1]) + 1) * batches[-1][0].shape[-1] <= budget:
            batches[-1].append(ids)
        else:
            batches.append([ids])
    out = []
    for group in batches:
        width = group[0].shape[-1]
        ids = torch.zeros((len(group), width), dtype=torch.long)
        valid = torch.zeros((len(group), width), dtype=torch.bool)
        for row, sample in enumerate(group):
            ids[row, : sample.shape[-1]] = sample.view(-1)
            valid[row, : sample.shape[-1]] = True
        out.append((ids, valid))
    return out


def _layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def capture_layer0_inputs(
    model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor], device: str
) -> list[CalibrationBatch]:
    """Run the model's stem (embeddings, masks, rotary) on batches of samples; record layer 0's inputs."""
    captured: list[CalibrationBatch] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(CalibrationBatch(hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"},
                                         torch.empty(0)))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        base = model.get_submodule("model")
        for ids, valid in batch_samples(samples):
            with suppress(_StopForward):
                base(input_ids=ids.to(device), use_cache=False)
            captured[-1].valid = valid.to(device)
    finally:
        handle.remove()
    return captured


@contextmanager
def _hessian_hooks(
    layer: nn.Module, groups: list[tuple[str, ...]], device: str, stop_after_last: bool
) -> Iterator[tuple[list[HessianAccumulator], list[torch.Tensor]]]:
    """One Hessian per group of linears that read the same input, fed by a pre-hook on the group's first linear.

    Only real tokens count (the hook reads the current batch's validity mask from the yielded one-element
    list). With ``stop_after_last`` the last group's hook ends the forward once its input is recorded.
    """
    accs: list[HessianAccumulator] = []
    current: list[torch.Tensor] = [torch.empty(0)]
    handles = []
    for gi, group in enumerate(groups):
        lin = layer.get_submodule(group[0])
        acc = HessianAccumulator(lin.in_features, device)
        accs.append(acc)
        stop = stop_after_last and gi == len(groups) - 1

        def hook(_m: nn.Module, inp: tuple, acc: HessianAccumulator = acc, stop: bool = stop) -> None:
            acc.add(inp[0].detach()[current[0]])
            if stop:
                raise _StopForward

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        yield accs, current
    finally:
        for h in handles:
            h.remove()


def _run_layer(layer: nn.Module, batches: list[CalibrationBatch], current: list[torch.Tensor] | None = None
               ) -> list[torch.Tensor]:
    """The layer's outputs for every batch; with ``current`` (a hook's mask slot), set it to each batch's mask."""
    outs = []
    for batch in batches:
        if current is not None:
            current[0] = batch.valid
        with suppress(_StopForward):
            outs.append(_layer_output(layer(batch.hidden, **batch.kwargs)))
    return outs


def quantize_sequential(
    model: nn.Module,
    store: WeightStore,
    spec: ArchSpec,
    samples: list[torch.Tensor],
    cfg: GPTQConfig,
    *,
    true_sequential: bool = False,
    skip: tuple[str, ...] = (),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_layer: Callable[[int, int, list[LayerReport]], None] | None = None,
) -> SequentialResult:
    """Quantize every decoder layer of a meta-device ``model`` whose weights live in ``store``.

    Args:
        model: a transformers causal LM built on the meta device (see :func:`marlin_cli.pipeline.models.meta_model`).
        store: the source model's tensors.
        spec: architecture names (layers, rotary, sequential groups).
        samples: calibration token ids, each [1, L].
        cfg: GPTQ settings (group size, damping, clipping).
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
    input_groups = [tuple(n for n in group if n not in skip) for group in spec.sequential]
    input_groups = [g for g in input_groups if g]
    # Passes over the calibration data per layer: one per input group with --true-sequential, else one.
    passes = [[g] for g in input_groups] if true_sequential else [input_groups]
    result = SequentialResult()
    for i, layer in enumerate(layers):
        prefix = f"{spec.layers}.{i}"
        store.materialize(model, prefix, device, dtype)
        layer_reports: list[LayerReport] = []
        with torch.no_grad():
            for groups in passes:
                # The layer's last linear (down_proj) ends the pass: its own product is not needed.
                last = groups[-1] == input_groups[-1] and input_groups[-1][-1] == spec.sequential[-1][-1]
                with _hessian_hooks(layer, groups, device, stop_after_last=last) as (accs, current):
                    _run_layer(layer, inputs, current)
                for group, acc in zip(groups, accs, strict=True):
                    t0 = time.perf_counter()
                    h = acc.finalize()
                    try:
                        prep = prepare_hessian(h, cfg)
                    except CholeskyError as err:
                        raise MarlinError(f"{prefix}.{group[0]} (and the linears sharing its input): {err}") from err
                    for name in group:
                        lin = layer.get_submodule(name)
                        w = lin.weight.data
                        qm = gptq_quantize(w, prep, cfg)
                        lin.weight.data = qm.weight.to(w.dtype)
                        full = f"{prefix}.{name}"
                        result.matrices[full] = QuantizedMatrix(qm.codes.cpu(), qm.scales.cpu(), torch.empty(0),
                                                                qm.damp, qm.retries)
                        layer_reports.append(LayerReport(full, (lin.out_features, lin.in_features),
                                                         relative_output_error(w, lin.weight.data, h),
                                                         qm.damp, qm.retries, time.perf_counter() - t0))
                        t0 = time.perf_counter()
                    del h
            outputs = _run_layer(layer, inputs)
        inputs = [CalibrationBatch(out, b.kwargs, b.valid) for out, b in zip(outputs, inputs, strict=True)]
        layers[i] = layer.to("meta")
        result.reports.extend(layer_reports)
        if on_layer is not None:
            on_layer(i, len(layers), layer_reports)
    return result


def quantize_nearest(
    store: WeightStore,
    spec: ArchSpec,
    num_layers: int,
    group_size: int,
    skip: tuple[str, ...] = (),
    on_layer: Callable[[int, int, list[LayerReport]], None] | None = None,
) -> SequentialResult:
    """Round-to-nearest baseline: every linear quantized from its own weights; no calibration data, no forward
    passes (so the relative output error is not measured and is reported as NaN)."""
    result = SequentialResult()
    for i in range(num_layers):
        reports = []
        for name in spec.linears:
            if name in skip:
                continue
            full = f"{spec.layers}.{i}.{name}"
            t0 = time.perf_counter()
            w = store.get(f"{full}.weight")
            qm = rtn_quantize(w, group_size)
            result.matrices[full] = QuantizedMatrix(qm.codes, qm.scales, torch.empty(0))
            reports.append(LayerReport(full, tuple(w.shape), float("nan"), 0.0, 0, time.perf_counter() - t0))
        result.reports.extend(reports)
        if on_layer is not None:
            on_layer(i, num_layers, reports)
    return result
