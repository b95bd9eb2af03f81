"""``marlin bench``: parse options, call :func:`marlin_cli.eval.bench.run_bench`, print the table, save JSON."""

from __future__ import annotations

from pathlib import Path

import click

from marlin_cli.eval.bench import PRESETS, VARIANTS, BenchOptions, now_utc, run_bench, summary_table
from marlin_cli.report import write_json
from marlin_cli.runtime import DTYPES


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError as err:
        raise click.BadParameter(f"expected integers separated by commas, got {text!r}") from err
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


@click.command("bench")
@click.argument("checkpoint", required=False)
@click.option("--synthetic", type=click.Choice(sorted(PRESETS)), default=None,
              help="Instead of CHECKPOINT: a random fp16 Llama of these real dimensions and its RTN quantization.")
@click.option("--layers", type=int, default=None, help="Decoder layers of the --synthetic model [default: all].")
@click.option("--baseline", default=None,
              help="The fp16 model to compare with [default: the checkpoint's source from its run record, "
                   "else random weights of its dimensions].")
@click.option("--batches", default="1,8,32", show_default=True, help="Batch sizes (sequences decoded at once).")
@click.option("--contexts", default="512,2048", show_default=True, help="Context lengths (tokens in the cache).")
@click.option("--steps", type=int, default=50, show_default=True, help="Decode steps per timed round.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Timed rounds; the best is reported.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True,
              help=f"Which of {', '.join(VARIANTS)} to measure.")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "-1"]), default="128", show_default=True,
              help="Group size of the --synthetic model's quantization.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True)
@click.option("--device", default="cuda", show_default=True, help="The CUDA device to measure.")
@click.option("--no-graphs", is_flag=True, help="Time eager decode steps (no CUDA graphs).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save as JSON.")
def bench_command(checkpoint: str | None, synthetic: str | None, layers: int | None, baseline: str | None,
                  batches: str, contexts: str, steps: int, rounds: int, variants: str, group_size: str, dtype: str,
                  device: str, no_graphs: bool, json_path: Path | None) -> None:
    """Decode tokens/s and ms per token of CHECKPOINT and of its fp16 original, on a CUDA GPU.

    Each point: a static KV cache prefilled with random prompts of the context length, then greedy decode
    steps captured in a CUDA graph and replayed; variants: fp16, marlin (linears one by one), marlin-fused
    (q/k/v and gate/up as one matmul each).
    """
    options = BenchOptions(
        checkpoint=checkpoint, synthetic=synthetic, layers=layers, baseline=baseline, batches=_ints(batches),
        contexts=_ints(contexts), steps=steps, rounds=rounds,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()), group_size=int(group_size),
        dtype=DTYPES[dtype], device=device, graphs=not no_graphs, progress=click.echo,
    )
    result = run_bench(options)
    click.echo(summary_table(result))
    if json_path is not None:
        write_json(json_path, {**result.to_dict(), "date": now_utc()})
        click.echo(f"saved {json_path}")
