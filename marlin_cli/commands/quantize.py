"""``marlin quantize``: option parsing only; the work is :func:`marlin_cli.pipeline.quantize.quantize`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gptq.format import GROUP_SIZES as _SIZES
from marlin_cli.formats import FORMATS
from marlin_cli.pipeline.models import arch_spec
from marlin_cli.pipeline.quantize import QuantizeJob, format_report, quantize
from marlin_cli.settings import DEFAULTS, METHODS, QuantSettings

GROUP_SIZES = click.Choice([str(g) for g in _SIZES])
"""The kernel's group sizes (:data:`gptq.format.GROUP_SIZES`) as a click choice."""


@click.command("quantize")
@click.argument("model")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to create.")
@click.option("--dataset", default=None,
              help="Calibration data: wikitext2, redpajama, c4 (hub), pydocs, botchan (built-in), or a local "
                   ".txt/.jsonl/.json/.parquet file. Default: pydocs for the built-in model, else redpajama.")
@click.option("--nsamples", type=int, default=None, help="Calibration samples (default 64 built-in, else 256).")
@click.option("--seqlen", type=int, default=None, help="Max tokens per sample (default 512 built-in, else 4096).")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="Seed for shuffling and window sampling.")
@click.option("--holdout", type=int, default=None,
              help="Documents of a local calibration file to hold out first (for evaluating on the rest); "
                   "default: the file is used whole. Named corpora always hold out their evaluation documents.")
@click.option("--group-size", type=GROUP_SIZES, default=str(DEFAULTS.group_size), show_default=True,
              help="Input features per scale; -1 = one scale per output channel.")
@click.option("--damp", type=float, default=DEFAULTS.damp, show_default=True,
              help="Hessian damping, fraction of mean(diag H).")
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULTS.method, show_default=True,
              help="fast: signed scales searched against the inputs' importance (one pass per layer); best: GPTQ "
                   "with signed scales; gptq: the original's GPTQ; rtn: round to nearest (no calibration data).")
@click.option("--no-clip", is_flag=True,
              help="Disable clipping: each group's scale just covers its weights (no shrink factors).")
@click.option("--nearest", is_flag=True, help="Same as --method rtn: the round-to-nearest baseline.")
@click.option("--true-sequential", is_flag=True,
              help="Quantize q/k/v, then o, then gate/up, then down, each on the outputs of the quantized ones.")
@click.option("--skip-gq", is_flag=True, help="Keep k_proj/v_proj in fp16 for grouped-query-attention models.")
@click.option("--format", "format_", type=click.Choice(list(FORMATS)), default=DEFAULTS.format, show_default=True,
              help="Checkpoint format.")
@click.option("--device", default=DEFAULTS.device, show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--activation-budget", "activation_budget", type=float, default=None,
              help="GiB of calibration activations kept on the GPU; the rest stream from pinned host memory "
                   "(same codes). Default: half the GPU memory free at the start.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last finished layer (its partial folder beside --out); "
                   "a partial of other settings, model or calibration is an error.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-layer table.")
def quantize_command(model: str, out: Path, dataset: str | None, nsamples: int | None, seqlen: int | None,
                     seed: int, holdout: int | None, group_size: str, damp: float, method: str, no_clip: bool,
                     nearest: bool,
                     true_sequential: bool, skip_gq: bool, format_: str, device: str,
                     activation_budget: float | None, resume: bool, force: bool, quiet: bool) -> None:
    """Quantize MODEL (a local Hugging Face folder, a hub id, or `smollm2-135m`) to a Marlin checkpoint."""
    settings = QuantSettings(dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, holdout=holdout,
                             group_size=int(group_size), damp=damp, method=method, clip=not no_clip, nearest=nearest,
                             true_sequential=true_sequential, skip_gq=skip_gq, format=format_, device=device,
                             activation_budget_gb=activation_budget)
    result = quantize(QuantizeJob(model=model, out=out, settings=settings, force=force, resume=resume),
                      progress=not quiet)
    rec = result.record
    if not quiet:
        spec_linears = arch_spec(json.loads((result.out_dir / "config.json").read_text())["model_type"]).linears
        click.echo(format_report(result.reports, spec_linears))
    calibration = (f"calibration {rec['nsamples']} x <= {rec['seqlen']} tokens of {rec['dataset']}" if rec["nsamples"]
                   else "no calibration data")
    click.echo(f"\nwrote {result.out_dir}  ({result.checkpoint_mb:.1f} MB, {len(rec['layers'])} linears, "
               f"{rec['method']} g{rec['group_size']}, {calibration})")
    click.echo(f"quantization {rec['quantize_seconds']:.1f} s, total {result.seconds:.1f} s, "
               f"peak memory {result.peak_rss_mb:.0f} MB")
