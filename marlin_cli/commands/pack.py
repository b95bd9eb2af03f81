"""``marlin pack``: option parsing only; the work is :func:`marlin_cli.pipeline.pack.pack_fake_quantized`."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.commands.quantize import GROUP_SIZES
from marlin_cli.formats import FORMATS
from marlin_cli.pipeline.pack import pack_fake_quantized
from marlin_cli.settings import DEFAULTS


@click.command("pack")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--scales", "scales", type=click.Path(path_type=Path), required=True,
              help="safetensors file with '<linear name>.scales' [out_features, groups] per quantized linear.")
@click.option("--group-size", type=GROUP_SIZES, required=True, help="Input features per scale; -1 per channel.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to create.")
@click.option("--format", "format_", type=click.Choice(list(FORMATS)), default=DEFAULTS.format, show_default=True,
              help="Checkpoint format.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def pack_command(model: Path, scales: Path, group_size: str, out: Path, format_: str, force: bool) -> None:
    """Pack a fake-quantized fp16 MODEL (weights already on a symmetric 4-bit grid) into a quantized checkpoint."""
    out_dir, count = pack_fake_quantized(model, scales, int(group_size), out, force=force, format_name=format_)
    click.echo(f"wrote {out_dir} ({count} linears packed, g{group_size}, {format_})")
