"""``marlin reproduce``: the perplexity table of a config (fp16 and one column per method), with pass/fail checks.

For each model (row): evaluate the unquantized model on every dataset, quantize it once per method the config
names (``methods``, e.g. rtn, gptq and the default fast) with the config's settings otherwise the same,
evaluate each saved checkpoint as a user would load it, and record the checkpoint sizes and quantization
times. Then write markdown + JSON and run the config's checks on every dataset: GPTQ beats RTN, the default
method beats GPTQ, and each bounded method stays within its ratio of fp16.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from marlin_cli.data.corpora import dataset_protocol
from marlin_cli.errors import MarlinError
from marlin_cli.eval.ppl import measure
from marlin_cli.eval.reproduce_config import DEFAULT_METHOD, FP16, DatasetSpec, ReproduceConfig
from marlin_cli.eval.reproduce_report import render_markdown
from marlin_cli.loading import load_model
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.report import write_json
from marlin_cli.runtime import device_description, resolve_device, resolve_dtype, versions


@dataclass(frozen=True)
class ReproduceOptions:
    """How to run a config.

    Attributes:
        out: folder for the checkpoints (``<out>/<model>/<method>``), ``table.md`` and ``table.json``.
        device: ``cpu`` / ``cuda[:N]``; ``None``: CUDA when available.
        max_windows, max_docs: override every dataset's bound (0: no bound, all windows/documents).
        models: names of the config's models to run (empty: all).
        progress: progress bars per window/document and per layer.
    """

    out: Path
    device: str | None = None
    max_windows: int | None = None
    max_docs: int | None = None
    models: tuple[str, ...] = ()
    progress: bool = True


class ReproductionFailed(MarlinError):
    """The table was built, but a check failed (GPTQ not better than RTN, the default not better than GPTQ, or
    a method further from fp16 than its bound)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def apply_overrides(spec: DatasetSpec, options: ReproduceOptions) -> DatasetSpec:
    """The dataset's bound with the command-line override for its protocol applied (0 lifts the bound).

    Resolving the protocol also checks the dataset name before any long work starts.
    """
    stream = dataset_protocol(spec.name) == "stream"
    if stream and options.max_windows is not None:
        spec = replace(spec, max_windows=options.max_windows or None)
    if not stream and options.max_docs is not None:
        spec = replace(spec, max_docs=options.max_docs or None)
    return spec


def checkpoint_megabytes(folder: Path) -> float:
    """Size of the checkpoint's weight files (``*.safetensors``) in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def _evaluate(
    path: str,
    datasets: tuple[DatasetSpec, ...],
    seed: int,
    device: str,
    dtype: Any,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Load ``path`` and measure every dataset (held-out documents drawn with the calibration ``seed``).

    Returns:
        ``{"identity": model identity, "datasets": {name: perplexity record}}``.
    """
    loaded = load_model(path, device=device, dtype=dtype)
    out: dict[str, Any] = {"identity": loaded.identity, "datasets": {}}
    for spec in datasets:
        result, info = measure(
            loaded.model,
            loaded.tokenizer,
            spec.name,
            spec.seqlen,
            max_windows=spec.max_windows,
            max_docs=spec.max_docs,
            seed=seed,
            progress=progress,
        )
        log(f"  {spec.name} ({result.protocol}): ppl {result.ppl:.3f} in {result.seconds:.0f} s")
        out["datasets"][spec.name] = {**result.to_dict(), "seqlen": spec.seqlen, "dataset": info}
    del loaded
    gc.collect()
    return out


def _quantize(
    config: ReproduceConfig, model_path: str, out: Path, method: str, device: str, progress: bool
) -> dict[str, Any]:
    """Quantize with the config's settings and ``method`` (a name in ``marlin_cli.settings.METHODS``) into ``out``.

    Returns:
        ``{"method", "path", "size_mb", "quantize_seconds", "calibration"}`` of the written checkpoint.
    """
    settings = config.method_settings(method, device)
    result = quantize(QuantizeJob(model=model_path, out=out, settings=settings, force=True), progress=progress)
    folder = Path(result.out_dir)
    record = result.record
    calibration = (f"{record['dataset']} {record['nsamples']} x <= {record['seqlen']} tokens, seed {record['seed']}"
                   if record["nsamples"] else "none (round to nearest reads no calibration data)")
    return {
        "method": settings.method,
        "path": str(folder),
        "size_mb": checkpoint_megabytes(folder),
        "quantize_seconds": result.seconds,
        "calibration": calibration,
    }


def run_model(
    config: ReproduceConfig,
    model_name: str,
    model_path: str,
    datasets: tuple[DatasetSpec, ...],
    options: ReproduceOptions,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """One row: perplexities of fp16 and of each method's checkpoint on every dataset, plus sizes and timings.

    ``row["variants"][column]`` for each of ``config.columns`` (``fp16``, then the methods).
    """
    device = resolve_device(options.device)
    dtype = resolve_dtype(config.dtype, device)
    row: dict[str, Any] = {"name": model_name, "path": model_path, "variants": {}}
    for column in config.columns:
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        if column == FP16:
            log(f"[{model_name}] fp16: evaluating {model_path}")
            target = model_path
        else:
            folder = options.out / model_name / column
            log(f"[{model_name}] {column}: quantizing to {folder}")
            entry["checkpoint"] = _quantize(
                config, model_path, folder, method=column, device=device, progress=options.progress
            )
            target = entry["checkpoint"]["path"]
        entry.update(
            _evaluate(target, datasets, config.settings.seed, device, dtype, options.progress, log)
        )
        entry["seconds"] = time.perf_counter() - start
        row["variants"][column] = entry
    return row


def check_rows(config: ReproduceConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every check of the config on every (model, dataset): ``{model, dataset, check, passed, detail}``.

    Per dataset, in this order: ``gptq < rtn``, ``<default> < gptq``, then ``<method> / fp16 <= <bound>`` for
    each bounded method in the config's order.
    """
    checks = config.checks
    results = []
    for row in rows:
        for ds in row["variants"][FP16]["datasets"]:
            ppl = {c: row["variants"][c]["datasets"][ds]["ppl"] for c in config.columns}
            found = []  # (check, passed, detail)
            if checks.gptq_beats_rtn:
                found.append(("gptq < rtn", ppl["gptq"] < ppl["rtn"], f"GPTQ {ppl['gptq']:.3f} vs RTN {ppl['rtn']:.3f}"))
            if checks.default_beats_gptq:
                d = DEFAULT_METHOD
                found.append((f"{d} < gptq", ppl[d] < ppl["gptq"],
                              f"{d} (the default) {ppl[d]:.3f} vs GPTQ {ppl['gptq']:.3f}"))
            for method, bound in checks.max_ppl_ratio.items():
                ratio = ppl[method] / ppl[FP16]
                found.append((f"{method} / fp16 <= {bound}", ratio <= bound,
                              f"{method} {ppl[method]:.3f} / fp16 {ppl[FP16]:.3f} = {ratio:.3f}"))
            results += [{"model": row["name"], "dataset": ds, "check": check, "passed": passed, "detail": detail}
                        for check, passed, detail in found]
    return results


def reproduce(config: ReproduceConfig, options: ReproduceOptions, log: Callable[[str], None] = _log) -> dict:
    """Build the table of ``config``, write ``table.md`` and ``table.json`` under ``options.out``.

    Returns:
        The JSON record (config, rows, checks, ``passed``, machine, versions, seconds); see
        :func:`raise_on_failure` for turning failed checks into an error.
    """
    start = time.perf_counter()
    wanted = set(options.models)
    unknown = wanted - {m.name for m in config.models}
    if unknown:
        raise MarlinError(
            f"no model named {sorted(unknown)} in {config.source_path}; it has {[m.name for m in config.models]}"
        )
    models = [m for m in config.models if not wanted or m.name in wanted]
    datasets = tuple(apply_overrides(d, options) for d in config.datasets)
    rows = []
    for m in models:
        row = run_model(config, m.name, m.path, datasets, options, log)
        row["reference"] = m.reference
        rows.append(row)
    checks = check_rows(config, rows)
    device = resolve_device(options.device)
    record = {
        "config": config.name,
        "config_path": config.source_path,
        "description": config.description,
        "reference_source": config.reference_source,
        "datasets": [vars(d) for d in datasets],
        "methods": list(config.methods),
        "default_method": DEFAULT_METHOD,
        "settings": {k: v for k, v in config.settings.to_dict().items() if k not in ("method", "nearest")},
        "dtype": str(resolve_dtype(config.dtype, device)).removeprefix("torch."),
        "device": device,
        "device_name": device_description(device),
        "rows": rows,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "seconds": time.perf_counter() - start,
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    options.out.mkdir(parents=True, exist_ok=True)
    write_json(options.out / "table.json", record)
    (options.out / "table.md").write_text(render_markdown(record) + "\n")
    return record


def raise_on_failure(record: dict[str, Any], where: Path) -> None:
    """Raise :class:`ReproductionFailed` listing every failed check of ``record`` (``where``: the table)."""
    failed = [c for c in record["checks"] if not c["passed"]]
    if failed:
        lines = "; ".join(f"{c['model']}/{c['dataset']}: {c['check']} failed ({c['detail']})" for c in failed)
        raise ReproductionFailed(f"reproduction {record['config']}: {lines} (table in {where})")
