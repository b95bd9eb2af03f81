"""``marlin quantize``: settings -> calibration data -> layer-by-layer GPTQ -> a checkpoint folder.

The orchestrator: :func:`quantize` reads top to bottom as the run goes. Where each step lives: calibration
tokens in :mod:`marlin_cli.data.corpora`, the source's tensors in :mod:`marlin_cli.pipeline.weights`, the
layer loop in :mod:`marlin_cli.pipeline.sequential` (which calls the solver, :mod:`gptq.solver`), the
checkpoint's tensors in :mod:`marlin_cli.pipeline.export` through the format's codec (:mod:`marlin_cli.formats`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from marlin_cli.data.corpora import calibration_samples, dataset_protocol
from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS, LinearShape
from marlin_cli.formats.folder import CheckpointWriter, check_output_dir
from marlin_cli.pipeline.export import write_tensors
from marlin_cli.pipeline.models import ArchSpec, arch_spec, meta_model, resolve_model_dir
from marlin_cli.pipeline.sequential import LayerReport, quantize_nearest, quantize_sequential
from marlin_cli.pipeline.weights import WeightStore
from marlin_cli.runtime import default_dtype, peak_rss_mb, versions
from marlin_cli.settings import QuantSettings


@dataclass(frozen=True)
class QuantizeJob:
    """One ``marlin quantize`` run: which model, where to, how (:class:`QuantSettings`), and may it overwrite."""

    model: str
    out: Path
    settings: QuantSettings = field(default_factory=QuantSettings)
    force: bool = False


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


def quantize(job: QuantizeJob, progress: bool = True, keep_matrices: bool = False) -> QuantizeResult:
    """Quantize ``job.model`` with ``job.settings`` and write the checkpoint folder ``job.out``.

    The steps, in order: settings resolved for the model; the output folder, model and format checked before
    any work; calibration tokens; layer-by-layer quantization (GPTQ, or round to nearest without data); the
    checkpoint written through the format's codec. ``keep_matrices`` also returns the unpacked codes and scales
    (as big as the packed model, x2).

    Raises MarlinError for bad input (missing model, unsupported architecture, unknown dataset, existing
    output folder, failed Cholesky). The output folder appears only when complete.
    """
    settings = job.settings.resolved(job.model)
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
    _check_format(codec, store, spec, config.num_hidden_layers, skip, settings.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    start = time.perf_counter()
    if settings.nearest:  # round to nearest reads no calibration data, but a bad dataset name is still an error
        dataset_protocol(settings.dataset)
        samples = []
    else:
        samples = calibration_samples(tokenizer, settings.dataset, settings.nsamples, settings.seqlen, settings.seed,
                                      holdout=settings.holdout)

    bar = tqdm(total=config.num_hidden_layers, desc="quantizing layers", unit="layer", disable=not progress)

    def on_layer(i: int, count: int, reports: list[LayerReport]) -> None:
        for r in reports:
            if r.retries:
                tqdm.write(f"{r.name}: the Hessian was not positive definite with damping {settings.damp:g}; "
                           f"retried {r.retries}x, quantized with damping {r.damp:g} x mean(diag H)")
        worst = max((r.rel_error for r in reports), default=0.0)
        bar.set_postfix(layer=i, worst_rel_err=f"{worst:.2e}")
        bar.update(1)

    with torch.no_grad():
        if settings.nearest:
            result = quantize_nearest(store, spec, config.num_hidden_layers, settings.group_size, skip, on_layer)
        else:
            result = quantize_sequential(meta_model(config), store, spec, samples, settings.gptq_config(),
                                         true_sequential=settings.true_sequential, skip=skip, device=settings.device,
                                         dtype=default_dtype(settings.device), on_layer=on_layer)
    bar.close()
    quant_seconds = time.perf_counter() - start

    config_dict = config.to_dict()
    config_dict["torch_dtype"] = "float16"
    config_dict["quantization_config"] = codec.quantization_config(settings, list(result.matrices))
    record = {
        "source_model": job.model, "source_dir": str(model_dir), **settings.to_dict(), "method": settings.method,
        "nsamples": len(samples), "calibration_tokens": int(sum(s.numel() for s in samples)),
        "quantize_seconds": round(quant_seconds, 2), "versions": versions(),
        "layers": [asdict(r) for r in result.reports],
    }
    with CheckpointWriter(out, force=job.force) as writer:
        write_tensors(writer, store, result.matrices, settings.group_size, codec)
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        out_dir = writer.finish(config_dict, tokenizer, record, source_dir=model_dir)
        size_mb = writer.total_bytes / 2**20
    return QuantizeResult(out_dir, result.reports, time.perf_counter() - start, peak_rss_mb(), size_mb, record,
                          result.matrices if keep_matrices else None)


def _check_format(codec: ModuleType, store: WeightStore, spec: ArchSpec, num_layers: int, skip: tuple[str, ...],
                  group_size: int) -> None:
    """The format's own check of every linear about to be quantized, before any calibration work."""
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
