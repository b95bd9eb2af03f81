"""``marlin reproduce``: parse options, call :func:`marlin_cli.eval.reproduce.reproduce`, print the table."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.eval.reproduce import ReproduceOptions, raise_on_failure, reproduce
from marlin_cli.eval.reproduce_config import load_config
from marlin_cli.eval.reproduce_report import render_markdown


@click.command("reproduce")
@click.option(
    "--config",
    "config_name",
    default="builtin",
    show_default=True,
    help="builtin (SmolLM2 on the built-in corpora, CPU), llama2 (the original's table), or a .json path.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for checkpoints, table.md and table.json [default: out/reproduce/<config name>].",
)
@click.option("--device", default=None, help="cpu or cuda[:N] [default: cuda when available].")
@click.option(
    "--max-windows", type=int, default=None, help="Override every stream dataset's bound (0: all windows)."
)
@click.option("--max-docs", type=int, default=None, help="Override every documents dataset's bound (0: all).")
@click.option("--model", "models", multiple=True, help="Run only this model of the config (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce_command(
    config_name: str,
    out: Path | None,
    device: str | None,
    max_windows: int | None,
    max_docs: int | None,
    models: tuple[str, ...],
    quiet: bool,
) -> None:
    """Build the perplexity table of a config: fp16 and one column per quantization method it names (rtn, gptq
    and the default, fast, in the shipped configs); exit 2 if one of its checks fails (GPTQ not better than RTN,
    the default not better than GPTQ, a method further from fp16 than its bound)."""
    config = load_config(config_name)
    options = ReproduceOptions(
        out=out or Path("out") / "reproduce" / config.name,
        device=device,
        max_windows=max_windows,
        max_docs=max_docs,
        models=models,
        progress=not quiet,
    )
    record = reproduce(config, options)
    click.echo(render_markdown(record))
    click.echo(f"\nsaved {options.out / 'table.md'} and {options.out / 'table.json'}")
    raise_on_failure(record, options.out / "table.md")
