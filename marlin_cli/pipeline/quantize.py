"""``marlin quantize``: calibration data -> sequential GPTQ -> a Marlin checkpoint folder."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from gptq import format as fmt
from gptq.solver import GPTQConfig
from marlin_cli.data.corpora import calibration_samples, dataset_protocol
from marlin_cli.errors import MarlinError
from marlin_cli.formats import marlin
from marlin_cli.formats.folder import CheckpointWriter, check_output_dir
from marlin_cli.pipeline.export import write_tensors
from marlin_cli.pipeline.models import BUILTIN_ALIASES, arch_spec, meta_model, resolve_model_dir
from marlin_cli.pipeline.sequential import LayerReport, quantize_nearest, quantize_sequential
from marlin_cli.pipeline.weights import WeightStore
from marlin_cli.runtime import peak_rss_mb, versions


@dataclass
class QuantizeOptions:
    """Everything ``marlin quantize`` takes. ``None`` picks the default for the model (see ``resolved``).

    Defaults: the built-in model calibrates on 64 Python-doc documents of at most 512 tokens; other models
    on 256 RedPajama documents of at most 4096 tokens (the original's setting). Seed 0, damping 0.1.
    """

    model: str
    out: Path
    dataset: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    group_size: int = 128
    damp: float = 0.1
    clip: bool = True
    nearest: bool = False
    true_sequential: bool = False
    skip_gq: bool = False
    device: str = "cpu"
    force: bool = False

    def resolved(self) -> QuantizeOptions:
        """A copy with the model-dependent defaults filled in and every value checked."""
        builtin = self.model in BUILTIN_ALIASES
        opts = QuantizeOptions(**{**asdict(self), "out": Path(self.out)})
        opts.dataset = self.dataset or ("pydocs" if builtin else "redpajama")
        opts.nsamples = (64 if builtin else 256) if self.nsamples is None else self.nsamples
        opts.seqlen = (512 if builtin else 4096) if self.seqlen is None else self.seqlen
        try:
            fmt.check_group_size(opts.group_size)
        except ValueError as err:
            raise MarlinError(f"--group-size: {err}") from err
        if opts.nsamples < 1:
            raise MarlinError(f"--nsamples must be at least 1, got {opts.nsamples}")
        if opts.seqlen < 2:
            raise MarlinError(f"--seqlen must be at least 2, got {opts.seqlen}")
        if not 0 < opts.damp < 10:
            raise MarlinError(f"--damp must lie in (0, 10) as a fraction of mean(diag H), got {opts.damp}")
        if opts.device.startswith("cuda") and not torch.cuda.is_available():
            raise MarlinError(f"--device {opts.device}: no CUDA device is visible; use --device cpu")
        return opts


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


def quantize(options: QuantizeOptions, progress: bool = True, keep_matrices: bool = False) -> QuantizeResult:
    """Quantize ``options.model`` and write the Marlin checkpoint ``options.out``.

    ``keep_matrices`` also returns the unpacked codes and scales (as big as the packed model, x2).

    Raises MarlinError for bad input (missing model, unsupported architecture, unknown dataset, existing
    output folder, failed Cholesky). The output folder appears only when complete.
    """
    opts = options.resolved()
    check_output_dir(opts.out, opts.force)
    model_dir = resolve_model_dir(opts.model)
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        raise MarlinError(f"{opts.model} is already quantized; quantize its unquantized original")
    spec = arch_spec(config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    if opts.nearest:  # round to nearest needs no calibration data, but a bad dataset name is still an error
        dataset_protocol(opts.dataset)
        samples = []
    else:
        samples = calibration_samples(tokenizer, opts.dataset, opts.nsamples, opts.seqlen, opts.seed)
    skip: tuple[str, ...] = ()
    if opts.skip_gq and config.num_key_value_heads < config.num_attention_heads:
        skip = spec.kv
    cfg = GPTQConfig(group_size=opts.group_size, damp=opts.damp, clip=opts.clip)
    dtype = torch.float32 if opts.device == "cpu" else torch.float16

    bar = tqdm(total=config.num_hidden_layers, desc="quantizing layers", unit="layer", disable=not progress)

    def on_layer(i: int, count: int, reports: list[LayerReport]) -> None:
        for r in reports:
            if r.retries:
                tqdm.write(f"{r.name}: the Hessian was not positive definite with damping {opts.damp:g}; "
                           f"retried {r.retries}x, quantized with damping {r.damp:g} x mean(diag H)")
        worst = max((r.rel_error for r in reports), default=0.0)
        bar.set_postfix(layer=i, worst_rel_err=f"{worst:.2e}")
        bar.update(1)

    store = WeightStore(model_dir)
    with torch.no_grad():
        if opts.nearest:
            result = quantize_nearest(store, spec, config.num_hidden_layers, opts.group_size, skip, on_layer)
        else:
            result = quantize_sequential(meta_model(config), store, spec, samples, cfg,
                                         true_sequential=opts.true_sequential, skip=skip, device=opts.device,
                                         dtype=dtype, on_layer=on_layer)
    bar.close()
    quant_seconds = time.perf_counter() - start

    method = "rtn" if opts.nearest else "gptq"
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = "float16"
    config_dict["quantization_config"] = marlin.quantization_config(
        opts.group_size, method, list(result.matrices), damp=opts.damp, clip=opts.clip and not opts.nearest,
        true_sequential=opts.true_sequential, skip_gq=bool(skip))
    record = {
        "source_model": opts.model, "source_dir": str(model_dir), "dataset": opts.dataset,
        "nsamples": len(samples), "seqlen": opts.seqlen, "seed": opts.seed, "group_size": opts.group_size,
        "method": method, "damp": opts.damp, "clip": opts.clip and not opts.nearest,
        "true_sequential": opts.true_sequential, "skip_gq": bool(skip), "device": opts.device,
        "calibration_tokens": int(sum(s.numel() for s in samples)), "quantize_seconds": round(quant_seconds, 2),
        "versions": versions(), "layers": [asdict(r) for r in result.reports],
    }
    with CheckpointWriter(opts.out, force=opts.force) as writer:
        write_tensors(writer, store, result.matrices, opts.group_size, marlin)
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        out_dir = writer.finish(config_dict, tokenizer, record, source_dir=model_dir)
        size_mb = writer.total_bytes / 2**20
    return QuantizeResult(out_dir, result.reports, time.perf_counter() - start, peak_rss_mb(), size_mb, record,
                          result.matrices if keep_matrices else None)


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
