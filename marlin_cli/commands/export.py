"""``marlin export``: option parsing only; the work is :func:`marlin_cli.pipeline.export.export_checkpoint`."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.formats import FORMATS
from marlin_cli.pipeline.export import export_checkpoint


@click.command("export")
@click.argument("checkpoint")
@click.option("--format", "format_", type=click.Choice(list(FORMATS)), required=True,
              help="Format to write: compressed-tensors (pack-quantized) or gptq, which vLLM and SGLang serve; "
                   "marlin, this tool's kernel layout.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to create.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export_command(checkpoint: str, format_: str, out: Path, force: bool) -> None:
    """Convert a quantized CHECKPOINT (Marlin, compressed-tensors or GPTQ) to another format, codes unchanged."""
    out_dir, count, source = export_checkpoint(checkpoint, format_, out, force=force)
    click.echo(f"wrote {out_dir} ({count} linears, {source} -> {format_})")
