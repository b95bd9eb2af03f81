"""Perplexity protocols as pure functions over a causal LM and token tensors.

Two protocols, as in the GPTQ (Frantar et al., 2022) and Marlin (Frantar et al., 2024, arXiv 2408.11743)
evaluations, each named in every result:

- ``stream`` (WikiText-2 style): one long token stream cut into non-overlapping windows of ``seqlen``
  tokens, the last partial window dropped; each window is its own forward pass and scores its
  ``seqlen - 1`` next-token predictions; ppl = exp(mean NLL over all scored tokens).
- ``documents`` (RedPajama style): each held-out document is its own forward pass; ppl = exp(mean over
  documents of each document's mean NLL), so a short document weighs as much as a long one. A document
  of one token predicts nothing and is skipped (and counted).

Example with ``seqlen = 4`` and a stream of 10 tokens ``t0..t9``: windows ``t0..t3`` and ``t4..t7`` are
scored (3 predictions each: t1|t0, t2|t0..t1, t3|t0..t2, ...), ``t8 t9`` is dropped; tokens_scored = 6.

The NLL is computed from logits upcast to float32, ``chunk`` positions at a time, so a 4096-token window
of a 32k-vocabulary model never needs a full float32 copy of its logits plus a log-softmax of the same
size. Sums are accumulated in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from marlin_cli.errors import MarlinError

Protocol = Literal["stream", "documents"]

#: Positions per float32 upcast in :func:`token_nll`: 1024 x 32000 x 4 B = 131 MB at a time.
DEFAULT_CHUNK = 1024


@dataclass(frozen=True)
class PplResult:
    """One perplexity measurement.

    Attributes:
        ppl: the perplexity, ``exp(nll_mean)``.
        protocol: ``"stream"`` or ``"documents"`` (see the module docstring).
        windows: number of ``seqlen`` windows scored (stream protocol), else ``None``.
        documents: number of documents scored (documents protocol), else ``None``.
        skipped_documents: documents of fewer than 2 tokens, which predict nothing (documents protocol).
        tokens_scored: number of next-token predictions that entered the mean.
        nll_mean: the mean NLL in nats: per token (stream) or mean of per-document means (documents).
        seqlen: window length (stream) or ``None`` (documents; each document has its own length).
        seconds: wall time of the forward passes.
    """

    ppl: float
    protocol: Protocol
    windows: int | None
    documents: int | None
    skipped_documents: int
    tokens_scored: int
    nll_mean: float
    seqlen: int | None
    seconds: float

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Negative log-likelihood of each target under its row of logits, computed in float32.

    Args:
        logits: ``[L, V]`` float tensor (any float dtype; upcast to float32 ``chunk`` rows at a time).
        targets: ``[L]`` int64 token ids, ``targets[i]`` scored by ``logits[i]``.
        chunk: rows per float32 upcast, bounding the extra memory to ``chunk * V * 4`` bytes (x2 for
            the log-softmax).

    Returns:
        ``[L]`` float32 NLL in nats, on the logits' device.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [L, V] and targets [L]; got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    parts = [
        torch.nn.functional.cross_entropy(
            logits[start : start + chunk].float(), targets[start : start + chunk], reduction="none"
        )
        for start in range(0, logits.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def sequence_nll(model: torch.nn.Module, ids: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """One forward pass over ``ids`` and the NLL of each next-token prediction.

    Args:
        model: a causal LM: ``model(input_ids=[1, L], use_cache=False)`` returns an object with
            ``.logits`` ``[1, L, V]`` (transformers) or that tensor itself.
        ids: ``[L]`` int64 token ids, ``L >= 2``, on the model's device.
        chunk: see :func:`token_nll`.

    Returns:
        ``[L - 1]`` float32 NLL of ``ids[1:]`` given their prefixes.
    """
    out = model(input_ids=ids.unsqueeze(0), use_cache=False)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return token_nll(logits[0, :-1], ids[1:], chunk)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def stream_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """Number of non-overlapping ``seqlen`` windows scored from ``n_tokens`` (partial last one dropped).

    Raises:
        MarlinError: ``seqlen < 2`` or a stream shorter than one window.
    """
    if seqlen < 2:
        raise MarlinError(f"seqlen must be at least 2 to score a next-token prediction; got {seqlen}")
    full = n_tokens // seqlen
    if full == 0:
        raise MarlinError(
            f"the evaluation stream has {n_tokens} tokens, fewer than one window of {seqlen}; use a smaller --seqlen"
        )
    if max_windows is not None and max_windows < 1:
        raise MarlinError(f"--max-windows must be at least 1; got {max_windows}")
    return full if max_windows is None else min(full, max_windows)


@torch.inference_mode()
def stream_perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    progress: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> PplResult:
    """Stream protocol: non-overlapping windows, last partial dropped, ppl = exp(mean token NLL).

    Args:
        model: causal LM (see :func:`sequence_nll`), in eval mode.
        tokens: ``[T]`` int64 token stream (the whole corpus tokenized once, no BOS inserted here).
        seqlen: window length; each window scores ``seqlen - 1`` tokens.
        max_windows: score only the first ``max_windows`` windows (``None``: all full windows).
        progress: show a tqdm bar per window.
        chunk: see :func:`token_nll`.
    """
    if tokens.dim() != 1:
        raise MarlinError(f"the token stream must be 1-D; got shape {tuple(tokens.shape)}")
    n_windows = stream_windows(tokens.numel(), seqlen, max_windows)
    device = model_device(model)
    start = time.perf_counter()
    nll_sum, scored = 0.0, 0
    for w in tqdm(
        range(n_windows), desc=f"ppl stream ({seqlen}-token windows)", unit="window", disable=not progress
    ):
        nll = sequence_nll(model, tokens[w * seqlen : (w + 1) * seqlen].to(device), chunk)
        nll_sum += nll.double().sum().item()
        scored += nll.numel()
    nll_mean = nll_sum / scored
    return PplResult(
        ppl=math.exp(nll_mean),
        protocol="stream",
        windows=n_windows,
        documents=None,
        skipped_documents=0,
        tokens_scored=scored,
        nll_mean=nll_mean,
        seqlen=seqlen,
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def documents_perplexity(
    model: torch.nn.Module,
    docs: Sequence[torch.Tensor],
    max_docs: int | None = None,
    progress: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> PplResult:
    """Documents protocol: one forward per document, ppl = exp(mean over documents of mean NLL).

    Args:
        model: causal LM (see :func:`sequence_nll`), in eval mode.
        docs: 1-D int64 token tensors, one per held-out document (already cut to the evaluation length).
        max_docs: consider only the first ``max_docs`` documents (``None``: all).
        progress: show a tqdm bar per document.
        chunk: see :func:`token_nll`.

    Documents of fewer than 2 tokens are skipped and counted in ``skipped_documents``.

    Raises:
        MarlinError: no document of at least 2 tokens.
    """
    if max_docs is not None and max_docs < 1:
        raise MarlinError(f"--max-docs must be at least 1; got {max_docs}")
    selected = list(docs if max_docs is None else docs[:max_docs])
    for i, doc in enumerate(selected):
        if doc.dim() != 1:
            raise MarlinError(f"document {i} must be a 1-D token tensor; got shape {tuple(doc.shape)}")
    device = model_device(model)
    start = time.perf_counter()
    means: list[float] = []
    scored = skipped = 0
    for doc in tqdm(selected, desc="ppl documents", unit="doc", disable=not progress):
        if doc.numel() < 2:
            skipped += 1
            continue
        nll = sequence_nll(model, doc.to(device), chunk)
        means.append(nll.double().mean().item())
        scored += nll.numel()
    if not means:
        raise MarlinError(f"none of the {len(selected)} documents has 2 or more tokens; nothing to score")
    nll_mean = math.fsum(means) / len(means)
    return PplResult(
        ppl=math.exp(nll_mean),
        protocol="documents",
        windows=None,
        documents=len(means),
        skipped_documents=skipped,
        tokens_scored=scored,
        nll_mean=nll_mean,
        seqlen=None,
        seconds=time.perf_counter() - start,
    )
