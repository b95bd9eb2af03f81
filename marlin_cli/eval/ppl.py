"""``marlin eval-ppl``: load a model or Marlin checkpoint, pick the dataset's protocol, measure perplexity.

The protocol follows the dataset (``stream`` for WikiText-2-like corpora, ``documents`` for
RedPajama-like ones, see :mod:`marlin_cli.eval.perplexity`) and is named in every result, together with
everything needed to compare two numbers: the dataset's content hash, seqlen, the number of windows or
documents, tokens scored, the model and checkpoint identity, device, dtype, seconds and library versions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marlin_cli.data.corpora import dataset_protocol, eval_documents, eval_stream
from marlin_cli.errors import MarlinError
from marlin_cli.eval.perplexity import PplResult, documents_perplexity, stream_perplexity
from marlin_cli.loading import load_model
from marlin_cli.report import render_table
from marlin_cli.runtime import device_description, resolve_device, resolve_dtype, versions

#: The original's evaluation length (the Marlin paper's Llama-2 tables use 4096-token sequences);
#: smaller when the model's maximum is smaller.
DEFAULT_SEQLEN = 4096
#: The original's held-out RedPajama set: the first 1024 kept documents.
DEFAULT_EVAL_DOCS = 1024


@dataclass(frozen=True)
class EvalOptions:
    """What ``marlin eval-ppl`` measures.

    Attributes:
        model: Marlin checkpoint folder, Hugging Face folder, hub id, or the alias ``smollm2-135m``.
        dataset: built-in (``botchan``, ``pydocs``), hub (``wikitext2``, ``redpajama``, ``c4``) or a local file.
        seqlen: window length (stream) or document cut (documents); ``None``: 4096 or the model's maximum.
        max_windows: score at most this many windows (stream protocol); ``None``: all.
        max_docs: score at most this many held-out documents (documents protocol); ``None``: 1024.
        seed: the seed that draws held-out documents (disjoint from calibration with the same seed).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``: CUDA when available.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"auto"`` (float16 on CUDA, float32 on CPU).
        progress: show a progress bar per window/document.
    """

    model: str
    dataset: str
    seqlen: int | None = None
    max_windows: int | None = None
    max_docs: int | None = None
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    progress: bool = True


def resolve_seqlen(seqlen: int | None, model: torch.nn.Module) -> int:
    """``seqlen``, or 4096 capped at the model's ``max_position_embeddings``; checked against that maximum."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seqlen is None:
        return DEFAULT_SEQLEN if limit is None else min(DEFAULT_SEQLEN, limit)
    if seqlen < 2:
        raise MarlinError(f"--seqlen must be at least 2; got {seqlen}")
    if limit is not None and seqlen > limit:
        raise MarlinError(f"--seqlen {seqlen} is longer than the model's maximum of {limit} positions")
    return seqlen


def measure(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: str,
    seqlen: int,
    max_windows: int | None = None,
    max_docs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PplResult, dict[str, Any]]:
    """Perplexity of an already-loaded model on ``dataset`` with the dataset's own protocol.

    Args:
        model: causal LM in eval mode.
        tokenizer: its tokenizer (Hugging Face ``PreTrainedTokenizer``-like).
        dataset: dataset name or local file (see :class:`EvalOptions`).
        seqlen: window length (stream) or document cut (documents).
        max_windows, max_docs, seed, progress: see :class:`EvalOptions`.

    Returns:
        The :class:`PplResult` and the dataset's description (name, protocol, source, sha256, ...).
    """
    if dataset_protocol(dataset) == "stream":
        tokens, info = eval_stream(tokenizer, dataset)
        result = stream_perplexity(model, tokens, seqlen, max_windows=max_windows, progress=progress)
    else:
        ndocs = DEFAULT_EVAL_DOCS if max_docs is None else max_docs
        docs, info = eval_documents(tokenizer, dataset, ndocs, seqlen, seed)
        result = documents_perplexity(model, docs, max_docs=max_docs, progress=progress)
    return result, _dataset_dict(info)


def _dataset_dict(info: Any) -> dict[str, Any]:
    """A JSON-ready copy of a ``DatasetInfo`` (a dataclass or anything with ``__dict__``)."""
    fields = dict(vars(info))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}


def check_options(options: EvalOptions) -> None:
    """The checks that need no model (dataset name, bounds, seqlen floor), so bad input fails before loading."""
    dataset_protocol(options.dataset)
    if options.seqlen is not None and options.seqlen < 2:
        raise MarlinError(f"--seqlen must be at least 2; got {options.seqlen}")
    for flag, value in (("--max-windows", options.max_windows), ("--max-docs", options.max_docs)):
        if value is not None and value < 1:
            raise MarlinError(f"{flag} must be at least 1; got {value}")


def evaluate_perplexity(options: EvalOptions) -> dict[str, Any]:
    """Load ``options.model`` and measure its perplexity on ``options.dataset``.

    Returns:
        The JSON-ready record: ``ppl``, ``protocol``, ``dataset`` (with ``sha256``), ``seqlen``,
        ``windows`` or ``documents``, ``tokens_scored``, ``nll_mean``, ``model`` (identity: path,
        alias, quantization config, weight hashes), ``device``, ``dtype``, ``seconds`` (forward passes)
        and ``versions``.
    """
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    check_options(options)
    loaded = load_model(options.model, device=device, dtype=dtype)
    seqlen = resolve_seqlen(options.seqlen, loaded.model)
    result, dataset = measure(
        loaded.model,
        loaded.tokenizer,
        options.dataset,
        seqlen,
        max_windows=options.max_windows,
        max_docs=options.max_docs,
        seed=options.seed,
        progress=options.progress,
    )
    return record(result, dataset, loaded.identity, device, dtype, seqlen, options.seed)


def record(
    result: PplResult,
    dataset: dict[str, Any],
    identity: dict[str, Any],
    device: str,
    dtype: torch.dtype,
    seqlen: int,
    seed: int,
) -> dict[str, Any]:
    """The JSON record of one measurement (see :func:`evaluate_perplexity`)."""
    out = result.to_dict()
    out.update(
        seqlen=seqlen,
        seed=seed,
        dataset=dataset,
        model=identity,
        device=device,
        device_name=device_description(device),
        dtype=str(dtype).removeprefix("torch."),
        versions=versions(),
        command=" ".join(sys.argv),
    )
    return out


def summary_table(rec: dict[str, Any]) -> str:
    """The table ``marlin eval-ppl`` prints for one record."""
    count = rec["windows"] if rec["protocol"] == "stream" else rec["documents"]
    unit = "windows" if rec["protocol"] == "stream" else "documents"
    sha = str(rec["dataset"].get("sha256", ""))[:12]
    model = rec["model"].get("model") or rec["model"].get("path")
    quant = "int4 (marlin)" if rec["model"].get("is_quantized") else "unquantized"
    headers = ["model", "weights", "dataset", "protocol", "seqlen", unit, "tokens", "ppl", "seconds"]
    row = [
        model,
        quant,
        f"{rec['dataset'].get('name')} ({sha})",
        rec["protocol"],
        rec["seqlen"],
        count,
        rec["tokens_scored"],
        rec["ppl"],
        round(rec["seconds"], 1),
    ]
    return render_table(headers, [row]) + f"\n{rec['device_name']}, {rec['dtype']}"
