"""lm-evaluation-harness on a Marlin checkpoint, through lm-eval's public model interface.

The checkpoint is loaded by :func:`marlin_cli.loading.load_model` (quantized linears become
``MarlinLinear``: the Marlin kernel on a GPU, the reference product on the CPU) and handed, as an
ordinary ``transformers.PreTrainedModel`` with its tokenizer, to ``lm_eval.models.huggingface.HFLM``
(``pretrained=<model instance>``). Nothing in transformers or lm-eval is patched.

From Python::

    from marlin_cli.eval.lm_eval_adapter import lm_eval_model
    from marlin_cli.loading import load_model
    import lm_eval

    lm = lm_eval_model(load_model("out/smollm2-g64", device="cuda"), batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], num_fewshot=0)

From the shell: ``marlin lm-eval out/smollm2-g64 --tasks mmlu --num-fewshot 0``.
lm-eval is an optional dependency: ``pip install 'marlin[eval]'`` (or ``pip install lm-eval``; tested
with lm-eval 0.4.13).
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marlin_cli.errors import MarlinError
from marlin_cli.loading import load_model
from marlin_cli.runtime import device_description, resolve_device, resolve_dtype, versions


@dataclass(frozen=True)
class LmEvalOptions:
    """What ``marlin lm-eval`` runs.

    Attributes:
        model: Marlin checkpoint folder (or any model :func:`load_model` accepts: fp16 baselines too).
        tasks: lm-eval task or group names (``mmlu``, ``hellaswag``, ...), or tasks under ``include_path``.
        num_fewshot: few-shot examples per prompt; ``None``: the task's default.
        limit: at most this many examples per task (an int), or a fraction (a float < 1); ``None``: all.
        batch_size: requests per forward pass.
        max_length: the longest context in tokens; ``None``: the model's ``max_position_embeddings``.
        device: ``cpu`` / ``cuda[:N]``; ``None``: CUDA when available.
        dtype: ``auto`` (float16 on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        include_path: folder of extra task YAML files (custom or offline tasks).
        seed: lm-eval's random, numpy, torch and few-shot seeds.
    """

    model: str
    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 1
    max_length: int | None = None
    device: str | None = None
    dtype: str = "auto"
    include_path: Path | None = None
    seed: int = 0


def _require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a MarlinError that says how to install it."""
    try:
        # imported here: lm-eval is an optional dependency (marlin[eval]), and it takes seconds to import
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - HFLM lives here
    except ImportError as err:
        raise MarlinError(
            "lm-eval is not installed; install the optional dependency: pip install 'marlin[eval]' "
            f"(or pip install lm-eval) ({err})"
        ) from err
    return lm_eval


def lm_eval_model(loaded: Any, batch_size: int = 1, max_length: int | None = None) -> Any:
    """Wrap a loaded model as lm-eval's ``HFLM`` (its public interface for a ready ``PreTrainedModel``).

    Args:
        loaded: a :class:`marlin_cli.loading.LoadedModel` (``model``, ``tokenizer``), already on its device.
        batch_size: requests per forward pass.
        max_length: context limit in tokens; ``None``: from the model config.

    Returns:
        An ``lm_eval.models.huggingface.HFLM`` usable with ``lm_eval.simple_evaluate(model=...)``.
    """
    lm_eval = _require_lm_eval()
    return lm_eval.models.huggingface.HFLM(
        pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_length=max_length
    )


def task_manager(include_path: Path | None) -> Any:
    """lm-eval's ``TaskManager`` with the built-in tasks plus the YAML tasks under ``include_path``."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager  # optional dependency, checked just above

    if include_path is not None and not Path(include_path).is_dir():
        raise MarlinError(f"--include-path {include_path} is not a folder of task YAML files")
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(manager: Any, tasks: tuple[str, ...]) -> None:
    """A MarlinError naming every task lm-eval does not know (with up to 5 close names each)."""
    known = manager.all_tasks
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if not tasks:
        raise MarlinError("give at least one task with --tasks (e.g. --tasks mmlu,hellaswag)")
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=5) for t in unknown}
        raise MarlinError(
            "unknown lm-eval task(s): "
            + "; ".join(f"{t} (close: {', '.join(h) or 'none'})" for t, h in hints.items())
            + " - see `lm-eval ls tasks`, or pass --include-path for your own task YAML"
        )


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten lm-eval's ``results["results"]`` to ``{task, metric, filter, value, stderr}`` rows."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue  # "alias", "sample_len" and stderr entries are not metrics of their own
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                }
            )
    return rows


def run_lm_eval(options: LmEvalOptions) -> dict[str, Any]:
    """Load ``options.model`` and run the lm-eval tasks on it.

    Returns:
        A JSON-ready record: ``metrics`` (task, metric, filter, value, stderr), ``n_samples`` per task,
        ``model`` identity, ``device``, ``dtype``, ``seconds``, ``versions`` (lm-eval's included) and the
        options.
    """
    lm_eval = _require_lm_eval()
    manager = task_manager(options.include_path)
    check_tasks(manager, options.tasks)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    loaded = load_model(options.model, device=device, dtype=dtype)
    lm = lm_eval_model(loaded, batch_size=options.batch_size, max_length=options.max_length)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(options.tasks),
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        task_manager=manager,
        log_samples=False,
        random_seed=options.seed,
        numpy_random_seed=options.seed,
        torch_random_seed=options.seed,
        fewshot_random_seed=options.seed,
    )
    seconds = time.perf_counter() - start
    return {
        "metrics": metric_rows(results),
        "n_samples": results.get("n-samples", {}),
        "model": loaded.identity,
        "device": device,
        "device_name": device_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "tasks": list(options.tasks),
        "num_fewshot": options.num_fewshot,
        "limit": options.limit,
        "seed": options.seed,
        "seconds": seconds,
        "versions": {**versions(), "lm_eval": getattr(lm_eval, "__version__", "unknown")},
    }
