"""``marlin lm-eval``: parse options, call :func:`marlin_cli.eval.lm_eval_adapter.run_lm_eval`, print and save."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.eval.lm_eval_adapter import LmEvalOptions, run_lm_eval
from marlin_cli.report import render_table, write_json
from marlin_cli.runtime import DTYPES


@click.command("lm-eval")
@click.argument("path")
@click.option("--tasks", required=True, help="Comma-separated lm-eval tasks or groups, e.g. mmlu,hellaswag.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples [default: the task's].")
@click.option("--limit", type=float, default=None, help="At most N examples per task (N < 1: a fraction).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--max-length", type=int, default=None, help="Context limit in tokens [default: the model's].")
@click.option("--device", default=None, help="cpu or cuda[:N] [default: cuda when available].")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True)
@click.option(
    "--include-path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of extra task YAML files (your own or offline tasks).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save as JSON."
)
def lm_eval_command(
    path: str,
    tasks: str,
    num_fewshot: int | None,
    limit: float | None,
    batch_size: int,
    max_length: int | None,
    device: str | None,
    dtype: str,
    include_path: Path | None,
    seed: int,
    json_path: Path | None,
) -> None:
    """Run lm-evaluation-harness tasks on PATH (a Marlin checkpoint or an unquantized model).

    Uses lm-eval's public HFLM interface with the loaded model; needs `pip install 'marlin[eval]'`.
    """
    options = LmEvalOptions(
        model=path,
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        dtype=dtype,
        include_path=include_path,
        seed=seed,
    )
    rec = run_lm_eval(options)
    rows = [[m["task"], m["metric"], m["filter"], m["value"], m["stderr"]] for m in rec["metrics"]]
    click.echo(render_table(["task", "metric", "filter", "value", "stderr"], rows, digits=4))
    click.echo(f"{rec['device_name']}, {rec['dtype']}, {rec['seconds']:.0f} s")
    if json_path is not None:
        write_json(json_path, rec)
        click.echo(f"saved {json_path}")
