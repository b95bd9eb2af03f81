"""Command-line entry point: ``marlin COMMAND``. Each command only parses options and calls one function."""

from __future__ import annotations

import sys

import click

from marlin_cli import __version__
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


from marlin_cli.cli_quantize import pack_command, quantize_command  # noqa: E402

main.add_command(quantize_command)
main.add_command(pack_command)

from marlin_cli.cli_eval import eval_ppl_command, lm_eval_command  # noqa: E402
from marlin_cli.cli_reproduce import reproduce_command  # noqa: E402

main.add_command(eval_ppl_command)
main.add_command(lm_eval_command)
main.add_command(reproduce_command)

from marlin_cli.cli_assets import fetch_assets_command  # noqa: E402

main.add_command(fetch_assets_command)

if __name__ == "__main__":
    main()
