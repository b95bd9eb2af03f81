"""Layer-by-layer quantization of a decoder: each layer is loaded, quantized, handed on and released in turn.

The inputs of decoder layer 0 are captured for every calibration sample; then for layer i: load its
weights from the shards, accumulate each linear's statistic from the layer's real inputs, quantize, and hand
the layer's outputs on to layer i + 1. A :class:`SolveMethod` says which statistic and which outputs:

* ``propagate="quantized"`` (GPTQ's scheme): the statistics are gathered in a pass with the layer's original
  weights over the inputs the *quantized* model gives, the layer is quantized, and a second pass recomputes its
  outputs with the quantized weights;
* ``propagate="float"``: the inputs are the unquantized model's, so one pass gathers the statistics and the
  outputs together (half the forward work).

The statistic is H = 2 X X^T / T for GPTQ, or the mean squared input per feature for the importance-weighted
round to nearest (:func:`gptq.solver.weighted_rtn_quantize`).

Memory, whatever the depth and the number of calibration tokens:

* device: one decoder layer (model dtype), its Hessians (float32 [K, K], at most one group's being solved
  at a time besides the accumulators of the current pass), the solver's working set (float32 copies of the
  group's stacked weights), and the activations up to ``activation_budget`` bytes
  (:class:`marlin_cli.pipeline.activations.ActivationStore`; the rest stream from pinned host memory);
* host: the activations beyond the budget, and one layer's quantized tensors: each finished layer is
  handed to ``on_layer_done`` (which writes it to disk) and dropped, unless ``keep_matrices``.

No host synchronisation inside a layer's solve (the relative errors of a layer are read back once, at its
end), so on a GPU the forwards and the solver are queued back to back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

from gptq.quantizer import ZERO
from gptq.solver import (
    CholeskyError,
    GPTQConfig,
    HessianAccumulator,
    ImportanceAccumulator,
    QuantizedMatrix,
    gptq_quantize,
    prepare_hessian,
    relative_output_error_tensor,
    rtn_quantize,
    weighted_rtn_quantize,
)
from gptq.tune import BlockTuner, TuneConfig
from marlin_cli.errors import MarlinError
from marlin_cli.pipeline.activations import ActivationStore, CalibrationBatch
from marlin_cli.pipeline.distributed import World
from marlin_cli.pipeline.models import ArchSpec, rebuild_rotary
from marlin_cli.pipeline.weights import WeightStore

__all__ = ["GPTQ_METHOD", "SOLVE_METHODS", "ActivationStore", "CalibrationBatch", "LayerReport", "LayerTiming", "SequentialResult",
           "SolveMethod", "batch_samples", "grid_weight", "quantize_nearest", "quantize_sequential"]


@dataclass(frozen=True)
class SolveMethod:
    """How the groups of a decoder layer are quantized from calibration data.

    Attributes:
        statistic: ``"hessian"`` (H [K, K], solved by GPTQ, :func:`gptq.solver.gptq_quantize`) or
            ``"importance"`` (E[x^2] [K], solved by :func:`gptq.solver.weighted_rtn_quantize`).
        propagate: ``"quantized"`` (each layer sees the quantized model's inputs; two passes a layer) or
            ``"float"`` (the unquantized model's; one pass a layer).
        tune: then tune each block's rounding and scales (:mod:`gptq.tune`) on the quantized model's inputs
            against the unquantized model's outputs: the quantized model's activations are carried as a
            second stream (twice the activation memory), and each layer costs the statistics pass, the
            tuning steps and an output pass of the quantized layer.
    """

    statistic: str = "hessian"
    propagate: str = "quantized"
    tune: TuneConfig | None = None

    def __post_init__(self) -> None:
        if self.statistic not in ("hessian", "importance") or self.propagate not in ("quantized", "float"):
            raise ValueError(f"unknown solve method {self}")
        if self.tune is not None and (self.statistic, self.propagate) != ("importance", "float"):
            raise ValueError("block tuning starts from the importance-weighted solution on the unquantized inputs")

    def accumulator(self, k: int, device: str) -> HessianAccumulator | ImportanceAccumulator:
        """A fresh accumulator of this method's statistic for K input features."""
        return HessianAccumulator(k, device) if self.statistic == "hessian" else ImportanceAccumulator(k, device)


GPTQ_METHOD = SolveMethod()
"""GPTQ on the quantized model's inputs (the original's scheme)."""

SOLVE_METHODS = {
    "fast": SolveMethod("importance", "float"),
    "best": SolveMethod("importance", "float", TuneConfig()),
    "gptq": GPTQ_METHOD,
}
"""The statistic and propagation of each calibrated ``--method`` (:data:`marlin_cli.settings.METHODS`); the
solver's own differences (signed scale search or clipping) are in :meth:`QuantSettings.gptq_config`."""


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
class LayerTiming:
    """Wall time of one decoder layer, in seconds (device work synchronised at the phase ends).

    Attributes:
        layer: index; load: reading its weights; forward: the Hessian passes and the output pass;
        solve: Hessian preparation, GPTQ and the error report; total: all of it; replayed: True for a layer
        that a resumed run only ran forward (from its written codes).
    """

    layer: int
    load: float
    forward: float
    solve: float
    total: float
    replayed: bool = False


@dataclass
class SequentialResult:
    """Per-linear reports and per-layer timings; with ``keep_matrices`` the quantized linears by full name
    (codes [N, K] uint8, scales [N, G] float32, on the CPU)."""

    matrices: dict[str, QuantizedMatrix] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    timings: list[LayerTiming] = field(default_factory=list)
    spilled_batches: int = 0
    """Calibration batches that lived in host memory (beyond the activation budget)."""


class _StopForward(Exception):
    """Raised by a hook once what a pass needs is recorded (the rest of the forward is skipped)."""


#: Calibration samples are run in right-padded batches of at most this many (padded) tokens: large matrix
#: products run at several times the speed of per-sample ones on a CPU. Causal attention means the real
#: tokens never see the padding after them, so their activations are those of a per-sample forward.
BATCH_TOKENS = 8192


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


def grid_weight(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weights ``(codes - 8) * s`` [N, K] from codes uint8 [N, K] and scales float32 [N, G]
    (G groups of ceil(K / G) columns; G = 1 per channel), computed in float32 as the solver does, in ``dtype``."""
    n, k = codes.shape
    per = -(-k // scales.shape[1])
    s = scales.to(torch.float32).repeat_interleave(per, dim=1)[:, :k]
    return ((codes.to(torch.float32) - ZERO) * s).to(dtype)


def capture_layer0_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str,
    store: ActivationStore,
) -> None:
    """Run the model's stem (embeddings, masks, rotary) on each batch (ids [B, L], valid [B, L]); record layer
    0's inputs in ``store``."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        base = model.get_submodule("model")
        for ids, valid in batches:
            with suppress(_StopForward):
                base(input_ids=ids.to(device), use_cache=False)
            hidden, kwargs = captured.pop()
            store.append(hidden, kwargs, valid, bool(valid.all()))
    finally:
        handle.remove()


@contextmanager
def _statistic_hooks(
    layer: nn.Module, groups: list[tuple[str, ...]], device: str, stop_after_last: bool, method: SolveMethod
) -> Iterator[tuple[list[HessianAccumulator | ImportanceAccumulator], list[torch.Tensor]]]:
    """One statistic per group of linears that read the same input, fed by a pre-hook on the group's first linear.

    Only real tokens count (the hook reads the current batch's validity mask from the yielded one-element
    list; ``None`` there means the whole batch is real). With ``stop_after_last`` the last group's hook ends the forward once its input is recorded.
    """
    accs: list[HessianAccumulator | ImportanceAccumulator] = []
    current: list[torch.Tensor | None] = [None]
    handles = []
    for gi, group in enumerate(groups):
        lin = layer.get_submodule(group[0])
        acc = method.accumulator(lin.in_features, device)
        accs.append(acc)
        stop = stop_after_last and gi == len(groups) - 1

        def hook(_m: nn.Module, inp: tuple, acc: HessianAccumulator | ImportanceAccumulator = acc,
                 stop: bool = stop) -> None:
            x = inp[0].detach()
            acc.add(x if current[0] is None else x[current[0]])  # None: every token is real (no mask, no sync)
            if stop:
                raise _StopForward

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        yield accs, current
    finally:
        for h in handles:
            h.remove()


def _statistic_pass(layer: nn.Module, acts: ActivationStore, current: list[torch.Tensor | None],
                    keep_outputs: bool = False) -> None:
    """Run the layer on every batch for its hooks; ``current`` gets each batch's mask. The outputs are dropped,
    or with ``keep_outputs`` replace the inputs (they are the next layer's: the statistics pass is then also the
    output pass)."""
    for i, batch in acts.iterate():
        current[0] = None if batch.full else batch.valid
        with suppress(_StopForward):
            out = layer(batch.hidden, **batch.kwargs)
            if keep_outputs:
                acts.replace_hidden(i, _layer_output(out))


def _output_pass(layer: nn.Module, acts: ActivationStore) -> None:
    """The layer's outputs replace its inputs, batch by batch (they are the next layer's inputs)."""
    for i, batch in acts.iterate():
        acts.replace_hidden(i, _layer_output(layer(batch.hidden, **batch.kwargs)))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


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
    on_layer_done: Callable[[int, dict[str, QuantizedMatrix], list[LayerReport], LayerTiming], None] | None = None,
    keep_matrices: bool = True,
    activation_budget: int | None = None,
    start_layer: int = 0,
    replay: Callable[[int], dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    world: World | None = None,
    method: SolveMethod = GPTQ_METHOD,
) -> SequentialResult:
    """Quantize every decoder layer of a meta-device ``model`` whose weights live in ``store``.

    Args:
        model: a transformers causal LM built on the meta device (see :func:`marlin_cli.pipeline.models.meta_model`).
        store: the source model's tensors.
        spec: architecture names (layers, rotary, sequential groups).
        samples: calibration token ids, each [1, L].
        cfg: solver settings (group size, damping, clipping, signed scale search).
        true_sequential: quantize the groups of spec.sequential one after another within each layer (only with
            ``method.propagate == "quantized"``: on the unquantized model's inputs there is nothing to wait for).
        skip: linear names within a layer to leave unquantized (e.g. k/v for --skip-gq).
        device: where layers run; dtype: their compute dtype (also the activations' dtype).
        on_layer: called after each decoder layer with (index, count, reports of that layer).
        on_layer_done: called after each quantized layer with (index, {full name: QuantizedMatrix with codes
            uint8 [N, K] and scales float32 [N, G] on the CPU}, reports, timing): the checkpoint writer's hook.
        keep_matrices: also keep every layer's matrices in the result (memory grows with depth; tests).
        activation_budget: bytes of calibration activations kept on ``device`` (None: all).
        start_layer: layers below it are already quantized (a resumed run): ``replay(i)`` gives their
            {linear name: (codes uint8 [N, K], scales float32 [N, G])} and they are only run forward (with the
            original weights instead when ``method.propagate == "float"``).
        world: the processes quantizing together (:mod:`marlin_cli.pipeline.distributed`); default: one.
        method: the statistic and the propagation (:class:`SolveMethod`; default GPTQ's).

    Returns:
        A :class:`SequentialResult` keyed by full linear names (e.g. ``model.layers.0.mlp.up_proj``).
    """
    world = world or World()
    layers: nn.ModuleList = model.get_submodule(spec.layers)
    # The stem: everything outside the decoder layers (embeddings, final norm, rotary) comes to the device.
    stem = sorted({n.rpartition(".")[0] for n in store.names() if not n.startswith((spec.layers + ".", "lm_head."))})
    for prefix in stem:
        store.materialize(model, prefix, device, dtype)
    rebuild_rotary(model, spec, device)
    all_batches = batch_samples(samples)
    mine = [b for j, b in enumerate(all_batches) if world.owns(j)]  # batch j goes to rank j mod W
    total_tokens = int(sum(s.numel() for s in samples))
    tuning = method.tune is not None
    if tuning and world.size > 1:
        raise MarlinError("--method best runs in one process (its block tuning is not distributed); run it "
                          "without torchrun, or use --method fast or gptq with several GPUs")
    half = activation_budget // 2 if tuning and activation_budget is not None else activation_budget
    acts = ActivationStore(device, half)
    with torch.no_grad():
        capture_layer0_inputs(model, layers, mine, device, acts)
    # With tuning, ``acts`` is the unquantized model's stream and ``quantized`` the quantized model's.
    quantized = _copy_store(acts, device, half) if tuning else None
    for prefix in stem:  # the stem is not needed again: free its device memory
        if prefix:
            model.get_submodule(prefix).to("meta")
    input_groups = [tuple(n for n in group if n not in skip) for group in spec.sequential]
    input_groups = [g for g in input_groups if g]
    # Passes over the calibration data per layer: one per input group with --true-sequential, else one.
    passes = [[g] for g in input_groups] if true_sequential else [input_groups]
    floating = method.propagate == "float"
    if floating and true_sequential:
        raise ValueError("true_sequential needs the quantized model's inputs (propagate='quantized')")
    result = SequentialResult(spilled_batches=acts.spilled)
    for i, layer in enumerate(layers):
        prefix = f"{spec.layers}.{i}"
        t_start = time.perf_counter()
        store.materialize(model, prefix, device, dtype)
        _sync(device)
        t_load = time.perf_counter() - t_start
        if i < start_layer:
            assert replay is not None, "start_layer needs replay"
            with torch.no_grad():
                if floating:
                    _output_pass(layer, acts)
                for name, (codes, scales) in ({} if floating and not tuning else replay(i)).items():
                    lin = layer.get_submodule(name)
                    lin.weight.data = grid_weight(codes.to(device), scales.to(device), lin.weight.dtype)
                if not floating or tuning:
                    _output_pass(layer, quantized if tuning else acts)
            _sync(device)
            layers[i] = layer.to("meta")
            total = time.perf_counter() - t_start
            result.timings.append(LayerTiming(i, t_load, total - t_load, 0.0, total, replayed=True))
            continue
        layer_matrices: dict[str, QuantizedMatrix] = {}
        errors: list[tuple[str, tuple[int, int], torch.Tensor, float, int, float]] = []
        t_fwd = t_solve = 0.0
        # The solver reads the weights as stored: a layer run in bfloat16 (fast/best on a bf16 CPU) would
        # otherwise hand it fp16 weights rounded to bf16's 8-bit mantissa.
        linears = [n for g in input_groups for n in g]
        if dtype == torch.bfloat16:
            originals = {n: store.get(f"{prefix}.{n}.weight").to(device) for n in linears}
        else:
            originals = {n: layer.get_submodule(n).weight.data for n in linears} if tuning else {}
        with torch.no_grad():
            for groups in passes:
                # The layer's last linear (down_proj) ends the pass: its own product is not needed (unless the
                # pass also gives the layer's outputs).
                last = groups[-1] == input_groups[-1] and input_groups[-1][-1] == spec.sequential[-1][-1]
                t0 = time.perf_counter()
                with _statistic_hooks(layer, groups, device, last and not floating, method) as (accs, current):
                    _statistic_pass(layer, acts, current, keep_outputs=floating)
                for acc in accs:
                    world.all_reduce_sum(acc.total)
                    if world.size > 1:
                        acc.tokens = total_tokens
                _sync(device)
                t1 = time.perf_counter()
                t_fwd += t1 - t0
                for group, acc in zip(groups, accs, strict=True):
                    owner = input_groups.index(group) % world.size
                    _solve_group(layer, prefix, group, acc, cfg, world, owner, layer_matrices, errors, originals)
                    del acc.total
                _sync(device)
                t_solve += time.perf_counter() - t1
        if tuning:
            assert quantized is not None and method.tune is not None
            t0 = time.perf_counter()
            _tune_layer(layer, prefix, originals, layer_matrices, quantized, acts, method.tune, dtype, i)
            _sync(device)
            t_solve += time.perf_counter() - t0
        with torch.no_grad():
            if not floating or tuning:
                t0 = time.perf_counter()
                _output_pass(layer, quantized if tuning else acts)
                _sync(device)
                t_fwd += time.perf_counter() - t0
        rel = torch.stack([e[2] for e in errors]).tolist()  # one host read of the layer's errors
        layer_reports = [LayerReport(name, shape, r, damp, retries, secs)
                         for (name, shape, _, damp, retries, secs), r in zip(errors, rel, strict=True)]
        layers[i] = layer.to("meta")
        total = time.perf_counter() - t_start
        timing = LayerTiming(i, t_load, t_fwd, t_solve, total)
        result.timings.append(timing)
        result.reports.extend(layer_reports)
        if on_layer_done is not None:
            on_layer_done(i, layer_matrices, layer_reports, timing)
        if keep_matrices:
            result.matrices.update(layer_matrices)
        if on_layer is not None:
            on_layer(i, len(layers), layer_reports)
    return result


def _copy_store(acts: ActivationStore, device: str, budget: int | None) -> ActivationStore:
    """A second activation stream holding copies of ``acts``' batches (same kwargs and masks)."""
    other = ActivationStore(device, budget)
    for _, b in acts.iterate():
        other.append(b.hidden.clone(), b.kwargs, b.valid, b.full)
    return other


def _rows(value: object, rows: torch.Tensor, batch: int) -> object:
    """``value`` (a tensor or nested tuple/list/dict) with the batch dimension (size ``batch``) cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    return value


def _tune_layer(layer: nn.Module, prefix: str, originals: dict[str, torch.Tensor],
                matrices: dict[str, QuantizedMatrix], quantized: ActivationStore, targets: ActivationStore,
                cfg: TuneConfig, dtype: torch.dtype, seed: int) -> None:
    """Tune the layer's quantized linears (:class:`gptq.tune.BlockTuner`) on samples drawn from the quantized
    stream, against the unquantized stream's outputs (``targets`` already holds this layer's outputs); the
    tuned codes and scales replace the entries of ``matrices`` and the layer's weights."""
    names = list(originals)
    start = {n: matrices[f"{prefix}.{n}"].scales.to(originals[n].device) for n in names}
    for n in names:  # the tuner reads the original weights (in the layer's dtype, where they are wider)
        layer.get_submodule(n).weight.data = originals[n].to(dtype)
    tuner = BlockTuner(layer, start, cfg, weights=originals)
    gen = torch.Generator().manual_seed(seed)
    batches = list(range(len(quantized)))
    for _ in range(cfg.steps):
        j = batches[int(torch.randint(len(batches), (1,), generator=gen))]
        qb, tb = quantized.batch(j), targets.batch(j)
        size = qb.hidden.shape[0]
        rows = torch.randperm(size, generator=gen)[: cfg.samples].to(qb.hidden.device)
        valid = None if qb.full else qb.valid[rows]
        with torch.enable_grad():  # the layer loop runs under no_grad
            tuner.step([tuner.loss(qb.hidden[rows], _rows(qb.kwargs, rows, size), tb.hidden[rows], valid, dtype)])
    for n, (codes, scales) in tuner.result().items():
        lin = layer.get_submodule(n)
        lin.weight.data = grid_weight(codes, scales, dtype)
        old = matrices[f"{prefix}.{n}"]
        pin = codes.is_cuda
        c_cpu = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=pin).copy_(codes, non_blocking=pin)
        s_cpu = torch.empty(scales.shape, dtype=scales.dtype, pin_memory=pin).copy_(scales, non_blocking=pin)
        matrices[f"{prefix}.{n}"] = QuantizedMatrix(c_cpu, s_cpu, torch.empty(0), old.damp, old.retries)


def _solve_group(layer: nn.Module, prefix: str, group: tuple[str, ...],
                 acc: HessianAccumulator | ImportanceAccumulator, cfg: GPTQConfig,
                 world: World, owner: int, out: dict[str, QuantizedMatrix],
                 errors: list[tuple[str, tuple[int, int], torch.Tensor, float, int, float]],
                 originals: dict[str, torch.Tensor] | None = None) -> None:
    """The linears of ``group`` (they read the same input, so share its statistic): their weights stacked by
    rows [sum N, K] and solved as one matrix by rank ``owner`` (GPTQ from H, or the importance-weighted round to
    nearest from E[x^2]), whose codes and scales every rank receives and turns into the same quantized weights.
    Appends to ``out`` (CPU codes/scales) and ``errors``. ``originals``: the weights as stored, by linear name,
    where the layer runs in a narrower dtype (else the layer's own weights are read)."""
    t0 = time.perf_counter()
    h = acc.finalize()
    lins = [layer.get_submodule(name) for name in group]
    weights = [(originals or {}).get(name, lin.weight.data) for name, lin in zip(group, lins, strict=True)]
    rows = [lin.out_features for lin in lins]
    k = lins[0].in_features
    g = k if cfg.group_size == -1 else cfg.group_size
    ngroups = 1 if cfg.group_size == -1 else -(-k // g)
    dev = lins[0].weight.device
    codes = torch.empty((sum(rows), k), dtype=torch.uint8, device=dev)
    scales = torch.empty((sum(rows), ngroups), dtype=torch.float32, device=dev)
    info = torch.zeros(2, dtype=torch.float64, device=dev)  # damp, retries
    if world.rank == owner and h.dim() == 1:
        qm = weighted_rtn_quantize(torch.cat(weights), h, cfg)
        codes, scales = qm.codes, qm.scales
    elif world.rank == owner:
        try:
            prep = prepare_hessian(h, cfg)
        except CholeskyError as err:
            raise MarlinError(f"{prefix}.{group[0]} (and the linears sharing its input): {err}") from err
        qm = gptq_quantize(torch.cat(weights), prep, cfg)
        codes, scales = qm.codes, qm.scales
        info = torch.tensor([qm.damp, qm.retries], dtype=torch.float64, device=dev)
    world.broadcast(codes, owner)
    world.broadcast(scales, owner)
    world.broadcast(info, owner)
    damp, retries = info.tolist()  # one small read per group (the owner's damping), as the report needs it
    seconds = (time.perf_counter() - t0) / len(group)
    pin = codes.is_cuda
    for name, lin, c, s in zip(group, lins, codes.split(rows), scales.split(rows), strict=True):
        w = (originals or {}).get(name, lin.weight.data)
        lin.weight.data = grid_weight(c, s, lin.weight.dtype)
        errors.append((f"{prefix}.{name}", (lin.out_features, lin.in_features),
                       relative_output_error_tensor(w, lin.weight.data, h), float(damp), int(retries), seconds))
        # pinned copies complete by the layer's closing synchronisation, before anyone reads them
        c_cpu = torch.empty(c.shape, dtype=c.dtype, pin_memory=pin).copy_(c, non_blocking=pin)
        s_cpu = torch.empty(s.shape, dtype=s.dtype, pin_memory=pin).copy_(s, non_blocking=pin)
        out[f"{prefix}.{name}"] = QuantizedMatrix(c_cpu, s_cpu, torch.empty(0), float(damp), int(retries))


def quantize_nearest(
    store: WeightStore,
    spec: ArchSpec,
    num_layers: int,
    group_size: int,
    skip: tuple[str, ...] = (),
    on_layer: Callable[[int, int, list[LayerReport]], None] | None = None,
    on_layer_done: Callable[[int, dict[str, QuantizedMatrix], list[LayerReport], LayerTiming], None] | None = None,
    keep_matrices: bool = True,
    start_layer: int = 0,
) -> SequentialResult:
    """Round-to-nearest baseline: every linear quantized from its own weights; no calibration data, no forward
    passes (so the relative output error is not measured and is reported as NaN). Layers below
    ``start_layer`` (already written by an interrupted run) are skipped."""
    result = SequentialResult()
    for i in range(start_layer, num_layers):
        t_start = time.perf_counter()
        reports, matrices = [], {}
        for name in spec.linears:
            if name in skip:
                continue
            full = f"{spec.layers}.{i}.{name}"
            t0 = time.perf_counter()
            w = store.get(f"{full}.weight")
            qm = rtn_quantize(w, group_size)
            matrices[full] = QuantizedMatrix(qm.codes, qm.scales, torch.empty(0))
            reports.append(LayerReport(full, tuple(w.shape), float("nan"), 0.0, 0, time.perf_counter() - t0))
        total = time.perf_counter() - t_start
        timing = LayerTiming(i, 0.0, 0.0, total, total)
        result.timings.append(timing)
        result.reports.extend(reports)
        if on_layer_done is not None:
            on_layer_done(i, matrices, reports, timing)
        if keep_matrices:
            result.matrices.update(matrices)
        if on_layer is not None:
            on_layer(i, num_layers, reports)
    return result
