"""``marlin eval-ppl``: parse options, call :func:`marlin_cli.eval.ppl.evaluate_perplexity`, print and save."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.eval.ppl import EvalOptions, evaluate_perplexity, summary_table
from marlin_cli.report import write_json
from marlin_cli.runtime import DTYPES


@click.command("eval-ppl")
@click.argument("path")
@click.option(
    "--dataset",
    default="botchan",
    show_default=True,
    help="botchan / pydocs (built-in), wikitext2 / redpajama / c4 (hub), or a local .txt/.jsonl/.json/.parquet.",
)
@click.option(
    "--seqlen",
    type=int,
    default=None,
    help="Window / document length [default: 4096, or the model's maximum].",
)
@click.option("--max-windows", type=int, default=None, help="Score at most N windows (stream protocol).")
@click.option(
    "--max-docs", type=int, default=None, help="Score at most N held-out documents [default: 1024]."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed that draws the held-out documents."
)
@click.option("--device", default=None, help="cpu or cuda[:N] [default: cuda when available].")
@click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default="auto",
    show_default=True,
    help="Compute dtype; auto = float16 on CUDA, float32 on CPU.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save as JSON."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_ppl_command(
    path: str,
    dataset: str,
    seqlen: int | None,
    max_windows: int | None,
    max_docs: int | None,
    seed: int,
    device: str | None,
    dtype: str,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Perplexity of PATH (Marlin checkpoint, model folder, hub id or smollm2-135m) with the dataset's protocol.

    Stream protocol (WikiText-2 style): the text tokenized once, non-overlapping windows, last partial
    window dropped, ppl = exp(mean token NLL). Documents protocol (RedPajama style): held-out documents,
    one forward each, ppl = exp(mean over documents of each document's mean NLL).
    """
    options = EvalOptions(
        model=path,
        dataset=dataset,
        seqlen=seqlen,
        max_windows=max_windows,
        max_docs=max_docs,
        seed=seed,
        device=device,
        dtype=dtype,
        progress=not quiet,
    )
    rec = evaluate_perplexity(options)
    click.echo(summary_table(rec))
    if json_path is not None:
        write_json(json_path, rec)
        click.echo(f"saved {json_path}")
