"""Calibration and evaluation tokens for the named corpora of ``configs/datasets.json`` and local files.

Two protocols, those of the GPTQ (Frantar et al., 2022) and Marlin (Frantar et al., 2024) evaluations: a
WikiText-2-style token stream and RedPajama-style whole documents (the per-dataset parameters are data in
``configs/datasets.json``):

* ``stream`` (botchan, wikitext2, c4, local ``.txt``): the text is one token stream, tokenized once
  WITHOUT special tokens (``add_special_tokens=False``: no BOS, as in the reference botchan numbers).
  Evaluation cuts :func:`eval_stream` into windows. Calibration takes ``nsamples`` windows of
  ``seqlen`` tokens at offsets ``random.Random(seed).randint(0, T - seqlen)`` of the calibration
  text. botchan and local ``.txt`` files have one text only, so their calibration windows come from
  the same text that is evaluated. c4 follows GPTQ's loader: a random training document longer than
  ``seqlen`` and a random window inside it, again and again.
* ``documents`` (pydocs, redpajama, local ``.jsonl``/``.json``/``.parquet``): every document is its
  own sequence, tokenized with the tokenizer's default special tokens (a Llama-2 tokenizer prepends
  BOS as the original did; SmolLM2's adds nothing). Documents are shuffled with
  ``random.Random(seed).shuffle`` over their index list; documents shorter than ``min_tokens`` (and
  longer than ``max_tokens`` where declared) are dropped; the first ``eval_reserve`` kept documents
  are the held-out eval set, calibration draws the next ``nsamples``. Calibration and evaluation are
  therefore disjoint for the same seed, whatever their seqlens. A document longer than the caller's
  ``seqlen`` is then dropped or cut to its first ``seqlen`` tokens (``long_documents``).
  A local documents file given for calibration is used whole: its hold-out (for :func:`eval_documents`)
  applies to calibration only when asked for (``holdout``, ``marlin quantize --holdout N``).

Hub corpora load through ``datasets.load_dataset``. When the Hub cannot be reached (``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE`` set, or a two-second connection check fails) they load in offline mode, from the
``datasets`` cache or not at all, and fail at once with a :class:`MarlinError` that says what to use instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlparse

import huggingface_hub.constants
import torch

from marlin_cli.data import assets
from marlin_cli.errors import MarlinError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ProtocolName = Literal["stream", "documents"]


@dataclass(frozen=True)
class DatasetInfo:
    """What text a result was computed on; JSON-ready.

    name: dataset name or local file path as given.
    protocol: "stream" or "documents".
    source: where the text came from (file path, or ``hub:<path>[<config>] split=<split>``).
    sha256: sha256 of the UTF-8 text used (stream: the whole text before tokenization; documents: the
        selected documents in order, each followed by a NUL byte).
    n_tokens: tokens used (stream: length of the token stream; documents: sum over documents).
    n_documents: documents used (documents protocol), else None.
    notes: protocol details worth keeping with a number (BOS, windows, held-out rule).
    """

    name: str
    protocol: ProtocolName
    source: str
    sha256: str
    n_tokens: int
    n_documents: int | None = None
    notes: str = ""


@dataclass(frozen=True)
class _Spec:
    """One resolved dataset: its declaration (``fields``) and, for local files, the path."""

    name: str
    fields: dict[str, Any]
    path: Path | None = None

    @property
    def protocol(self) -> ProtocolName:
        return self.fields["protocol"]


class _TextColumn(Protocol):
    """Random access to the texts of a corpus: ``len(col)``, ``col[i] -> str``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> str: ...


@dataclass(frozen=True)
class _HubColumn:
    """The ``field`` column of a ``datasets.Dataset``, read row by row (no full materialisation)."""

    rows: Any
    field: str

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self.rows[i][self.field]


# ---------------------------------------------------------------- declarations


def _declarations() -> dict[str, Any]:
    """``datasets.json`` from the installed ``marlin_configs`` package, else the repository's configs/."""
    try:
        text = (resources.files("marlin_configs") / "datasets.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parents[2] / "configs" / "datasets.json").read_text()
    return json.loads(text)


def _choices(decl: dict[str, Any]) -> str:
    names = ", ".join(sorted(decl["datasets"]))
    suffixes = ", ".join(sorted(decl["local"]))
    return f"a built-in or hub dataset ({names}) or a local file ({suffixes})"


def _resolve(dataset: str) -> _Spec:
    """Look ``dataset`` up by name, else treat it as a local file; :class:`MarlinError` if neither."""
    decl = _declarations()
    if dataset in decl["datasets"]:
        return _Spec(dataset, decl["datasets"][dataset])
    path = Path(dataset).expanduser()
    suffix = path.suffix.lower()
    if suffix not in decl["local"]:
        what = "file type" if path.suffix else "dataset"
        raise MarlinError(f"unknown {what} {dataset!r}: use {_choices(decl)}")
    if not path.is_file():
        raise MarlinError(f"dataset file {path} does not exist: use {_choices(decl)}")
    fields = decl["local"][suffix]
    fields = decl["local"][fields["same_as"]] if "same_as" in fields else fields
    return _Spec(str(path), fields, path)


def dataset_protocol(dataset: str) -> ProtocolName:
    """ "stream" or "documents" for a dataset name or local file (see the module docstring)."""
    return _resolve(dataset).protocol


# ---------------------------------------------------------------- raw text


HUB_CHECK_SECONDS = 2.0
"""How long the reachability check waits for a TCP connection to the Hub before calling it unreachable."""

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be used now (offline switch set, or no connection), or None.

    Reads ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` at call time, then tries a TCP connection to the
    Hub's endpoint for at most :data:`HUB_CHECK_SECONDS`.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var} is set"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "huggingface_hub is in offline mode"
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_CHECK_SECONDS).close()
    except OSError as err:
        return f"{host} is unreachable ({err})"
    return None


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` in offline mode (cache only, no retries) for the block."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load_hub(part: dict[str, Any]) -> Any:
    """``datasets.load_dataset`` for one declared split; a clear error, at once, when the hub is unreachable."""
    try:
        import datasets  # optional dependency (marlin[data]); only hub corpora need it
    except ImportError as err:
        raise MarlinError("hub datasets need the `datasets` package: pip install 'datasets>=2.19'") from err
    kwargs = {k: part[k] for k in ("name", "data_files") if k in part}
    offline = hub_unreachable()
    try:
        with _offline(datasets) if offline else contextlib.nullcontext():
            return datasets.load_dataset(part["path"], split=part["split"], **kwargs)
    except Exception as err:  # the hub client raises many types (ConnectionError, OSError, HTTP errors)
        why = f"the Hub cannot be reached ({offline}) and it is not in the datasets cache" if offline else \
            f"{type(err).__name__}: {err}"
        raise MarlinError(
            f"could not load {_hub_source(part)} from the Hugging Face Hub ({why}). "
            "Without hub access use a built-in dataset (botchan, pydocs) or a local .txt/.jsonl/.json/.parquet file"
        ) from err


def _hub_source(part: dict[str, Any]) -> str:
    config = f"[{part['name']}]" if "name" in part else ""
    files = f" files={sorted(part['data_files'].values())}" if "data_files" in part else ""
    return f"hub:{part['path']}{config} split={part['split']}{files}"


def _builtin_path(asset: str) -> Path:
    return {"botchan": assets.botchan_path, "pydocs": assets.pydocs_dir}[asset]()


def _read_text(path: Path) -> str:
    """A file as Python text mode reads it: UTF-8, universal newlines (CRLF -> LF), a BOM kept.

    botchan.txt has CRLF line ends; read this way it is 70,191 SmolLM2 tokens = 68 windows of 1024,
    the reference's count (the raw CRLF bytes would give 74,441 tokens).
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MarlinError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from err


def _stream_text(spec: _Spec, part: Literal["calibration", "eval"]) -> tuple[str, str]:
    """The text of a stream dataset's calibration or eval part, and where it came from."""
    fields = spec.fields
    if spec.path is not None:
        return _read_text(spec.path), str(spec.path)
    if fields["source"] == "builtin":
        path = _builtin_path(fields["asset"])
        return _read_text(path), str(path)
    decl = fields[part]
    column = _HubColumn(_load_hub(decl), decl.get("text_field", "text"))
    count = min(len(column), decl.get("first_documents", len(column)))
    return decl["join"].join(column[i] for i in range(count)), _hub_source(decl)


def _local_documents(path: Path, field: str) -> list[str]:
    """Texts of a local .jsonl / .json / .parquet file; :class:`MarlinError` without a ``field``."""
    if path.suffix.lower() == ".parquet":
        return _parquet_documents(path, field)
    raw = _read_text(path)
    try:
        rows = json.loads(raw)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:  # JSON lines
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise MarlinError(
                    f"{path}:{lineno} is not valid JSON ({err}); expected one object per line"
                ) from err
    texts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise MarlinError(
                f"{path}: record {i} has no string {field!r} field; each record must be an object "
                f'like {{"{field}": "..."}}'
            )
        texts.append(row[field])
    return texts


def _parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq  # optional dependency (comes with datasets); only .parquet needs it
    except ImportError as err:
        raise MarlinError(
            "reading .parquet needs pyarrow: pip install 'datasets>=2.19' (or pyarrow)"
        ) from err
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged or non-parquet file
        raise MarlinError(f"{path} is not a readable parquet file ({err})") from err
    if field not in schema.names:
        raise MarlinError(f"{path} has no {field!r} column (columns: {', '.join(schema.names)}); add one")
    texts = pq.read_table(path, columns=[field]).column(field).to_pylist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise MarlinError(f"{path}: row {bad[0]} of column {field!r} is not a string")
    return texts


def _documents(spec: _Spec) -> tuple[_TextColumn, str]:
    """All documents of a documents dataset in a fixed order (before shuffling), and their source."""
    fields = spec.fields
    if spec.path is not None:
        return _local_documents(spec.path, fields.get("text_field", "text")), str(spec.path)
    if fields["source"] == "builtin":
        root = _builtin_path(fields["asset"])
        files = sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix())
        return [_read_text(p) for p in files], str(root)
    decl = fields["documents"]
    return _HubColumn(_load_hub(decl), fields.get("text_field", "text")), _hub_source(decl)


# ---------------------------------------------------------------- tokenization and selection


def _encode_stream(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, verbose=False)["input_ids"]


Doc = tuple[str, list[int]]


def _kept_documents(
    tokenizer: PreTrainedTokenizerBase, texts: _TextColumn, fields: dict, seed: int
) -> Iterator[Doc]:
    """Documents in seeded shuffled order that pass the dataset's token-length filter, lazily."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    lo, hi = fields.get("min_tokens", 2), fields.get("max_tokens")
    for i in order:
        text = texts[i]
        ids = _encode_document(tokenizer, text)
        if len(ids) >= lo and (hi is None or len(ids) <= hi):
            yield text, ids


def _split(
    tokenizer: PreTrainedTokenizerBase, spec: _Spec, seed: int, reserve: int | None = None
) -> tuple[list[Doc], Iterator[Doc], str]:
    """(held-out documents, iterator over the remaining kept documents, source).

    ``reserve``: how many to hold out; ``None``: the dataset's evaluation hold-out (``eval_reserve``).
    """
    texts, source = _documents(spec)
    kept = _kept_documents(tokenizer, texts, spec.fields, seed)
    fraction = spec.fields.get("eval_reserve_max_fraction")
    if reserve is None:
        reserve = spec.fields["eval_reserve"]
    else:
        fraction = None
    if fraction is not None:  # small local files: hold out at most this share of the usable documents
        everything = list(kept)
        reserve = min(reserve, int(len(everything) * fraction))
        kept = iter(everything)
    held = [doc for _, doc in zip(range(reserve), kept, strict=False)]
    return held, kept, source


def _cut(ids: list[int], seqlen: int, rule: str) -> list[int] | None:
    """Apply ``long_documents`` at ``seqlen``: the tokens to use, or None to drop the document."""
    if len(ids) <= seqlen:
        return ids
    return ids[:seqlen] if rule == "truncate" else None


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        least = 2 if name == "seqlen" else 1
        if value < least:
            raise MarlinError(f"{name} must be at least {least}, got {value}")


def _long(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- public API


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, dataset: str, nsamples: int, seqlen: int, seed: int,
    holdout: int | None = None,
) -> list[torch.Tensor]:
    """``nsamples`` calibration sequences, each a torch.long tensor of shape [1, L], 2 <= L <= seqlen.

    Stream datasets give windows of exactly ``min(seqlen, T)`` tokens; documents datasets give whole
    documents (dropped or cut at ``seqlen`` per dataset). A named documents corpus never gives one of its
    held-out eval documents; a local file is used whole unless ``holdout`` documents are asked to be held
    out first (``holdout`` has no effect on named corpora or streams).
    Deterministic for a given seed. :class:`MarlinError` for an unknown dataset or too few documents.
    """
    _check_sizes(nsamples=nsamples, seqlen=seqlen)
    spec = _resolve(dataset)
    if spec.protocol == "documents":
        reserve = (holdout or 0) if spec.path is not None else None
        held, rest, source = _split(tokenizer, spec, seed, reserve)
        samples = []
        for _, ids in rest:
            cut = _cut(ids, seqlen, spec.fields["long_documents"])
            if cut is not None:
                samples.append(_long(cut)[None])
                if len(samples) == nsamples:
                    return samples
        fix = f"lower --nsamples to {len(samples)}" if samples else "use a larger corpus"
        after = f" after the {len(held)} held-out ones" if held else ""
        raise MarlinError(
            f"{spec.name} ({source}) has only {len(samples)} calibration documents of 2..{seqlen} tokens"
            f"{after}, {nsamples} asked; {fix} or use another dataset"
        )
    rng = random.Random(seed)
    if spec.fields.get("calibration", {}).get("windows") == "long_documents":
        return _windows_in_long_documents(tokenizer, spec, nsamples, seqlen, rng)
    text, source = _stream_text(spec, "calibration")
    ids = _encode_stream(tokenizer, text)
    if len(ids) < 2:
        raise MarlinError(f"{spec.name} ({source}) has {len(ids)} tokens; calibration needs at least 2")
    length = min(seqlen, len(ids))
    starts = [rng.randint(0, len(ids) - length) for _ in range(nsamples)]
    return [_long(ids[s : s + length])[None] for s in starts]


def _windows_in_long_documents(
    tokenizer: PreTrainedTokenizerBase, spec: _Spec, nsamples: int, seqlen: int, rng: random.Random
) -> list[torch.Tensor]:
    """GPTQ's c4 calibration: a random document with more than seqlen tokens, a random window in it."""
    decl = spec.fields["calibration"]
    column = _HubColumn(_load_hub(decl), decl.get("text_field", "text"))
    samples: list[torch.Tensor] = []
    tries = 0
    while len(samples) < nsamples:
        tries += 1
        if tries > 1000 * nsamples:
            raise MarlinError(f"{spec.name}: too few documents longer than seqlen={seqlen}; lower --seqlen")
        ids = _encode_stream(tokenizer, column[rng.randrange(len(column))])
        if len(ids) > seqlen:
            start = rng.randint(0, len(ids) - seqlen)
            samples.append(_long(ids[start : start + seqlen])[None])
    return samples


def eval_stream(tokenizer: PreTrainedTokenizerBase, dataset: str) -> tuple[torch.Tensor, DatasetInfo]:
    """The eval text of a stream dataset tokenized once without BOS: torch.long tensor [T], and its info.

    :class:`MarlinError` if the dataset uses the documents protocol (use :func:`eval_documents`).
    """
    spec = _resolve(dataset)
    if spec.protocol != "stream":
        raise MarlinError(f"{spec.name} is a documents dataset: evaluate it per document (eval_documents)")
    text, source = _stream_text(spec, "eval")
    ids = _encode_stream(tokenizer, text)
    cap = spec.fields.get("eval", {}).get("max_tokens")
    notes = "one stream (text mode: CRLF -> LF), tokenized once, add_special_tokens=False (no BOS)"
    if cap is not None and len(ids) > cap:
        ids = ids[:cap]
        notes += f"; cut to its first {cap} tokens"
    if spec.path is not None or spec.fields["source"] == "builtin":
        notes += "; calibration windows (if any) came from this same text"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    info = DatasetInfo(spec.name, "stream", source, digest, len(ids), None, notes)
    return _long(ids), info


def eval_documents(
    tokenizer: PreTrainedTokenizerBase, dataset: str, ndocs: int, seqlen: int, seed: int
) -> tuple[list[torch.Tensor], DatasetInfo]:
    """Up to ``ndocs`` held-out documents, each a 1-D torch.long tensor of 2..seqlen tokens, and info.

    These are the dataset's first ``eval_reserve`` kept documents for ``seed`` (pydocs 64, redpajama
    1024), with the dataset's rule at ``seqlen`` applied (pydocs: cut to the first seqlen tokens;
    redpajama: documents longer than seqlen dropped); ``ndocs`` above the reserve gives the whole
    reserve. :class:`MarlinError` for stream datasets (use :func:`eval_stream`).
    """
    _check_sizes(ndocs=ndocs, seqlen=seqlen)
    spec = _resolve(dataset)
    if spec.protocol != "documents":
        raise MarlinError(f"{spec.name} is a stream dataset: evaluate it in windows (eval_stream)")
    held, _, source = _split(tokenizer, spec, seed)
    rule = spec.fields["long_documents"]
    digest = hashlib.sha256()
    docs: list[torch.Tensor] = []
    for text, ids in held:
        cut = _cut(ids, seqlen, rule)
        if cut is None:
            continue
        docs.append(_long(cut))
        digest.update(text.encode("utf-8") + b"\0")
        if len(docs) == ndocs:
            break
    if not docs:
        raise MarlinError(f"{spec.name} ({source}) has no held-out documents of 2..{seqlen} tokens")
    notes = (
        f"documents shuffled with random.Random({seed}); the first {len(held)} with "
        f"{spec.fields.get('min_tokens', 2)}..{spec.fields.get('max_tokens', 'any')} tokens are held out; "
        f"longer than seqlen={seqlen}: {rule}; tokenizer's default special tokens"
    )
    info = DatasetInfo(
        spec.name, "documents", source, digest.hexdigest(), sum(len(d) for d in docs), len(docs), notes
    )
    return docs, info
