"""``marlin quantize``: settings -> calibration data -> layer-by-layer GPTQ -> a checkpoint folder.

The orchestrator: :func:`quantize` reads top to bottom as the run goes. Where each step lives: calibration
tokens in :mod:`marlin_cli.data.corpora`, the source's tensors in :mod:`marlin_cli.pipeline.weights`, the
layer loop in :mod:`marlin_cli.pipeline.sequential` (which calls the solver, :mod:`gptq.solver`), the
checkpoint's tensors through the format's codec (:mod:`marlin_cli.formats`) into the folder writer
(:mod:`marlin_cli.formats.folder`), one decoder layer at a time as each is finished; resuming in
:mod:`marlin_cli.pipeline.resume`, several GPUs in :mod:`marlin_cli.pipeline.distributed`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from marlin_cli.data.corpora import calibration_samples, dataset_protocol
from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS, LinearShape, QuantizedLinear
from marlin_cli.formats.folder import CheckpointWriter, check_output_dir, partial_dir
from marlin_cli.pipeline import export
from marlin_cli.pipeline.distributed import init_from_env
from marlin_cli.pipeline.models import ArchSpec, arch_spec, meta_model, resolve_model_dir
from marlin_cli.pipeline.resume import (
    check_journal,
    inputs_hash,
    layers_done,
    read_journal,
    replay_layer,
    settings_for_hash,
)
from marlin_cli.pipeline.sequential import (
    SOLVE_METHODS,
    LayerReport,
    LayerTiming,
    quantize_nearest,
    quantize_sequential,
)
from marlin_cli.pipeline.weights import WeightStore
from marlin_cli.runtime import peak_rss_mb, quantize_dtype, versions
from marlin_cli.settings import QuantSettings


@dataclass(frozen=True)
class QuantizeJob:
    """One ``marlin quantize`` run: which model, where to, how (:class:`QuantSettings`), may it overwrite, and
    may it continue an interrupted run's partial folder (``resume``)."""

    model: str
    out: Path
    settings: QuantSettings = field(default_factory=QuantSettings)
    force: bool = False
    resume: bool = False


@dataclass
class QuantizeResult:
    """What a run produced: the checkpoint folder, per-linear reports, timing and memory."""

    out_dir: Path
    reports: list[LayerReport]
    seconds: float
    peak_rss_mb: float
    checkpoint_mb: float
    record: dict = field(default_factory=dict)
    matrices: dict | None = None
    """With ``keep_matrices``: full linear name -> QuantizedMatrix (codes uint8 [N, K], scales float32 [N, G])."""


def quantize(job: QuantizeJob, progress: bool = True, keep_matrices: bool = False,
             max_shard_bytes: int = 2 << 30, after_layer: Callable[[int], None] | None = None) -> QuantizeResult:
    """Quantize ``job.model`` with ``job.settings`` and write the checkpoint folder ``job.out``.

    The steps, in order: settings resolved for the model; the output folder, model and format checked before
    any work; calibration tokens; the partial folder opened (fresh, or with ``job.resume`` the interrupted
    run's, checked against this run's inputs hash); the non-layer tensors written; layer-by-layer
    quantization (GPTQ, or round to nearest without data), each finished layer's tensors written through the
    format's codec at once; the folder completed and renamed into place. ``keep_matrices`` also returns the
    unpacked codes and scales (as big as the packed model, x2: memory then grows with depth).
    ``after_layer(i)`` is called once layer i is on disk (tests use it to interrupt a run).

    Under ``torchrun`` (WORLD_SIZE > 1) each process takes its share of the calibration batches; only rank 0
    writes (see :mod:`marlin_cli.pipeline.distributed`).

    Raises MarlinError for bad input (missing model, unsupported architecture, unknown dataset, existing
    output folder, failed Cholesky, a partial folder of other inputs). The output folder appears only when
    complete; an interrupted run (any other exception, Ctrl-C) keeps its partial folder for ``--resume``.
    """
    settings = job.settings.resolved(job.model)
    world, device = init_from_env(settings.device)
    out = Path(job.out)
    check_output_dir(out, job.force)
    model_dir = resolve_model_dir(job.model)
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        raise MarlinError(f"{job.model} is already quantized; quantize its unquantized original")
    spec = arch_spec(config.model_type)
    skip = spec.kv if settings.skip_gq and config.num_key_value_heads < config.num_attention_heads else ()
    settings = replace(settings, skip_gq=bool(skip))  # what was done: skip_gq only acts on GQA models
    codec = FORMATS[settings.format]
    store = WeightStore(model_dir)
    num_layers = config.num_hidden_layers
    shapes = _check_format(codec, store, spec, num_layers, skip, settings.group_size)
    note = getattr(export, "serving_warning", lambda *_: None)(codec, shapes)
    if note and world.is_main:
        print(note, file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    start = time.perf_counter()
    if settings.nearest:  # round to nearest reads no calibration data, but a bad dataset name is still an error
        dataset_protocol(settings.dataset)
        samples = []
    else:
        samples = calibration_samples(tokenizer, settings.dataset, settings.nsamples, settings.seqlen, settings.seed,
                                      holdout=settings.holdout)
    quantized = [f"{spec.layers}.{i}.{n}" for i in range(num_layers) for g in spec.sequential for n in g
                 if n not in skip]
    digest = inputs_hash(model_dir, settings, samples)
    partial = partial_dir(out)
    writer = None
    if world.is_main:
        if job.resume:
            check_journal(read_journal(partial), digest, settings, partial)
        writer = CheckpointWriter(out, force=job.force, max_shard_bytes=max_shard_bytes, resume=job.resume)
    world.barrier()
    journal = read_journal(partial) if job.resume else {}
    done = layers_done(journal)
    prior_reports = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in journal.get("reports", [])]
    prior_timings = [LayerTiming(**t) for t in journal.get("timings", [])]

    bar = tqdm(total=num_layers, initial=done, desc="quantizing layers", unit="layer",
               disable=not progress or not world.is_main)

    def on_layer(i: int, count: int, reports: list[LayerReport]) -> None:
        for r in reports:
            if r.retries and world.is_main:
                tqdm.write(f"{r.name}: the Hessian was not positive definite with damping {settings.damp:g}; "
                           f"retried {r.retries}x, quantized with damping {r.damp:g} x mean(diag H)")
        worst = max((r.rel_error for r in reports), default=0.0)
        bar.set_postfix(layer=i, worst_rel_err=f"{worst:.2e}")
        bar.update(1)

    all_reports = list(prior_reports)
    all_timings = list(prior_timings)

    def on_layer_done(i: int, matrices: dict, reports: list[LayerReport], timing: LayerTiming) -> None:
        all_reports.extend(reports)
        all_timings.append(timing)
        if writer is not None:
            prefix = f"{spec.layers}.{i}."
            _add_tensors(writer, store, [n for n in store.names() if n.startswith(prefix)], matrices,
                         settings.group_size, codec)
            writer.commit(f"layer-{i:05d}", layers_done=i + 1, reports=[asdict(r) for r in all_reports],
                          timings=[asdict(t) for t in all_timings])
        if after_layer is not None:
            after_layer(i)

    def replay(i: int) -> dict:
        prefix = f"{spec.layers}.{i}"
        return replay_layer(partial, journal, i, [m for m in quantized if m.startswith(prefix + ".")], codec,
                            settings, prefix)

    try:
        with writer if writer is not None else nullcontext():
            if writer is not None:
                writer.set_journal(inputs_sha256=digest, settings_for_hash=settings_for_hash(settings),
                                   source_model=job.model)
                writer.keep_on_error = True
                if not writer.journal.get("rest_done"):  # embeddings, final norm, lm_head: streamed by shard
                    written = {n for p in writer.journal["parts"] if p["key"].startswith("rest-") for n in p["names"]}
                    rest = [n for n in store.names() if not n.startswith(spec.layers + ".") and n not in written]
                    _add_tensors(writer, store, rest, {}, settings.group_size, codec, commit_every="rest",
                                 first=sum(p["key"].startswith("rest-") for p in writer.journal["parts"]))
                    writer.set_journal(rest_done=True)
            with torch.no_grad():
                if settings.nearest:
                    result = quantize_nearest(store, spec, num_layers, settings.group_size, skip, on_layer,
                                              on_layer_done, keep_matrices=keep_matrices, start_layer=done)
                else:
                    result = quantize_sequential(
                        meta_model(config), store, spec, samples, settings.gptq_config(),
                        true_sequential=settings.true_sequential, skip=skip, device=device,
                        dtype=quantize_dtype(device, settings.method), on_layer=on_layer, on_layer_done=on_layer_done,
                        keep_matrices=keep_matrices, activation_budget=_budget_bytes(settings, device),
                        start_layer=done, replay=replay, world=world, method=SOLVE_METHODS[settings.method])
            bar.close()
            quant_seconds = time.perf_counter() - start
            result.timings = [t for t in result.timings if t.replayed] + all_timings
            record = {
                "source_model": job.model, "source_dir": str(model_dir), **settings.to_dict(),
                "method": settings.method, "nsamples": len(samples),
                "calibration_tokens": int(sum(s.numel() for s in samples)),
                "quantize_seconds": round(quant_seconds, 2), "versions": versions(),
                "world_size": world.size, "resumed_at_layer": done if job.resume else None,
                "inputs_sha256": digest, "spilled_batches": result.spilled_batches,
                "layer_seconds": [asdict(t) for t in result.timings],
                "layers": [asdict(r) for r in all_reports],
            }
            if device.startswith("cuda"):
                record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 1e6, 1)
            record["peak_rss_mb"] = round(peak_rss_mb(), 1)
            out_dir, size_mb = out, 0.0
            if writer is not None:
                config_dict = config.to_dict()
                config_dict["torch_dtype"] = "float16"
                config_dict["quantization_config"] = codec.quantization_config(settings, quantized)
                out_dir = writer.finish(config_dict, tokenizer, record, source_dir=model_dir)
                size_mb = writer.total_bytes / 1e6  # MB = 10^6 bytes, as every size printed
            world.barrier()
    except BaseException as err:
        if writer is not None and writer.keep_on_error and not isinstance(err, MarlinError) and partial.exists():
            print(f"\ninterrupted ({type(err).__name__}) after {layers_done(read_journal(partial))} of {num_layers} "
                  f"layers; the partial checkpoint is kept in {partial}: run the same command with --resume to "
                  "continue", file=sys.stderr, flush=True)
        raise
    return QuantizeResult(out_dir, all_reports, time.perf_counter() - start, peak_rss_mb(), size_mb, record,
                          result.matrices if keep_matrices else None)


def _budget_bytes(settings: QuantSettings, device: str) -> int | None:
    """Activation bytes kept on the GPU: the setting, or half the GPU memory free now (None on the CPU)."""
    if settings.activation_budget_gb is not None:
        return int(settings.activation_budget_gb * 2**30)
    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free // 2


def _add_tensors(writer: CheckpointWriter, store: WeightStore, names: list[str], matrices: dict, group_size: int,
                 codec: ModuleType, commit_every: str | None = None, first: int = 0) -> None:
    """Queue ``names`` (source tensors) in ``writer``: quantized linears' weights as ``codec`` encodes them
    (``matrices``: full linear name -> codes uint8 [N, K], scales float32 [N, G]), the rest as fp16. With
    ``commit_every`` a part ``<commit_every>-<n>`` is committed whenever the queue reaches a shard's size, and
    at the end, so that only one shard's tensors are in memory at a time."""
    count = first
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in matrices and leaf == "weight":
            qm = matrices[module]
            for key, tensor in codec.encode(QuantizedLinear(module, qm.codes, qm.scales, group_size)).items():
                writer.add(key, tensor)
        else:
            tensor = store.get(name)
            writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)
        if commit_every is not None and writer.pending_bytes >= writer.max_shard_bytes // 2:
            writer.commit(f"{commit_every}-{count}")
            count += 1
    if commit_every is not None:
        writer.commit(f"{commit_every}-{count}")


def _check_format(codec: ModuleType, store: WeightStore, spec: ArchSpec, num_layers: int, skip: tuple[str, ...],
                  group_size: int) -> list[LinearShape]:
    """The format's own check of every linear about to be quantized, before any calibration work; their shapes."""
    shapes = []
    for i in range(num_layers):
        for name in spec.linears:
            if name not in skip:
                full = f"{spec.layers}.{i}.{name}"
                n, k = store.shape(f"{full}.weight")
                shapes.append(LinearShape(full, k, n))
    problems = codec.check(shapes, group_size)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MarlinError(f"the {codec.NAME} format cannot hold this model: " + "; ".join(problems[:5]) + more)
    return shapes


def _cell(value: float | None) -> str:
    if value is None:
        return f"{'fp16':>11}"
    return f"{'-':>11}" if value != value else f"{value:>11.2e}"  # NaN: not measured (round to nearest)


def format_report(reports: list[LayerReport], linears: tuple[str, ...]) -> str:
    """A table: one row per decoder layer, one column per linear, cells = relative output error."""
    short = [n.rpartition(".")[2] for n in linears]
    rows: dict[str, dict[str, float]] = {}
    for r in reports:
        layer, _, tail = r.name.rpartition(".")
        layer = layer.rpartition(".")[0] if "." in layer else layer
        rows.setdefault(layer, {})[tail] = r.rel_error
    head = f"{'layer':<20}" + "".join(f"{s:>11}" for s in short)
    lines = ["relative output error tr(dW H dW^T) / tr(W H W^T) on the calibration data", head, "-" * len(head)]
    for layer, cells in rows.items():
        lines.append(f"{layer:<20}" + "".join(_cell(cells.get(s)) for s in short))
    retried = [r for r in reports if r.retries]
    if retried:
        lines.append(f"raised damping (Cholesky retried) for {len(retried)} linears: "
                     + ", ".join(f"{r.name} ({r.damp:g})" for r in retried))
    return "\n".join(lines)
