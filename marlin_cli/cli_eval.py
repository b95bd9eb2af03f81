"""``marlin eval-ppl``: parse options, call :func:`marlin_cli.evaluate.evaluate_perplexity`, print and save."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.evaluate import DTYPES, EvalOptions, evaluate_perplexity, summary_table, write_json


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
    from marlin_cli.evaluate import render_table
    from marlin_cli.lm_eval_adapter import LmEvalOptions, run_lm_eval

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
