"""Command-line entry point: ``marlin COMMAND``. Each command (``marlin_cli/commands/``) only parses options
and calls one function of the pipeline or of eval."""

from __future__ import annotations

import sys

import click

from marlin_cli import __version__
from marlin_cli.commands.bench import bench_command
from marlin_cli.commands.eval_ppl import eval_ppl_command
from marlin_cli.commands.export import export_command
from marlin_cli.commands.fetch_assets import fetch_assets_command
from marlin_cli.commands.lm_eval import lm_eval_command
from marlin_cli.commands.pack import pack_command
from marlin_cli.commands.quantize import quantize_command
from marlin_cli.commands.reproduce import reproduce_command
from marlin_cli.errors import MarlinError


class _Group(click.Group):
    """Turns :class:`MarlinError` into a one-line message and exit code 2 instead of a stack trace."""

    def invoke(self, ctx: click.Context):  # noqa: D401
        try:
            return super().invoke(ctx)
        except MarlinError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="marlin")
def main() -> None:
    """GPTQ 4-bit quantization to the Marlin kernel format, and honest perplexity evaluation."""


for command in (quantize_command, pack_command, export_command, eval_ppl_command, lm_eval_command, reproduce_command,
                fetch_assets_command, bench_command):
    main.add_command(command)

if __name__ == "__main__":
    main()
