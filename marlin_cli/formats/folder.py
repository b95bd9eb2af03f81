"""A checkpoint folder written whole or not at all: safetensors shards, config, tokenizer and the run record.

Format-independent: every checkpoint format (Marlin, compressed-tensors, GPTQ) hands its tensors to a
:class:`CheckpointWriter`; what the tensors are is the format's business (see :mod:`marlin_cli.formats`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import load_file, save_file

from marlin_cli.errors import MarlinError

RUN_RECORD = "marlin_run.json"
"""The run record every checkpoint carries: how it was made (settings, source, versions, per-layer errors)."""


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse to touch an existing ``out_dir`` unless ``force``; call before any expensive work."""
    if out_dir.exists() and not force:
        raise MarlinError(f"{out_dir} already exists; choose another --out or pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise MarlinError(f"{out_dir} exists and is not a directory; choose another --out")


PARTIAL_SUFFIX = ".partial-run"
"""The hidden folder a run writes into: ``.<out name>.partial-run`` beside ``out_dir`` (renamed when complete)."""

JOURNAL = "resume.json"
"""In the partial folder: the run's settings, the hash of its inputs, the committed parts and layer reports."""


def partial_dir(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its unfinished checkpoint."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointWriter:
    """Writes a checkpoint in *parts* in a hidden folder beside ``out_dir``; ``finish`` renames it into place.

    Tensors are queued with :meth:`add` and written to disk with :meth:`commit` as one safetensors part
    (written to a temporary name, then renamed: a part on disk is whole). The pipeline commits each decoder
    layer as soon as it is quantized and the other tensors in parts of at most ``max_shard_bytes``, so the
    process never holds more than one layer's (or one shard's) tensors. A journal (``resume.json``) lists
    the committed parts in order, with whatever the caller stores in it (:meth:`set_journal`), so that an
    interrupted run can continue (``resume=True``) from its last committed part.

    ``finish`` turns the parts into the checkpoint's shards: one ``model.safetensors`` when everything fits
    in ``max_shard_bytes`` (the parts are merged), else one ``model-0000i-of-0000n.safetensors`` per part
    with its index. Leaving the ``with`` block by an exception removes the folder, unless ``keep_on_error``
    says the run can be resumed (an interruption rather than a bad input), so no half checkpoint ever looks
    whole.
    """

    def __init__(self, out_dir: Path, force: bool = False, max_shard_bytes: int = 2 << 30, resume: bool = False
                 ) -> None:
        self.out_dir = Path(out_dir)
        self.force = force
        check_output_dir(self.out_dir, force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_dir(self.out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.keep_on_error = False
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.journal: dict = {"parts": [], "bytes": 0}
        if resume and (self.tmp / JOURNAL).is_file():
            self.journal = json.loads((self.tmp / JOURNAL).read_text())
            # a part file not in the journal was cut off by the crash: it is rewritten
            known = {p["file"] for p in self.journal["parts"]}
            for f in self.tmp.iterdir():
                if f.name not in known and f.name != JOURNAL:
                    f.unlink()
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data committed so far."""
        return int(self.journal["bytes"])

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        resumable = exc_type is not None and self.keep_on_error and not issubclass(exc_type, MarlinError)
        if self.tmp.exists() and not resumable:  # a bad input (MarlinError) would fail again: no partial kept
            shutil.rmtree(self.tmp, ignore_errors=True)

    def has_part(self, key: str) -> bool:
        """Whether part ``key`` was committed (by this run or the one it resumes)."""
        return any(p["key"] == key for p in self.journal["parts"])

    def part_file(self, key: str) -> Path:
        """The file of committed part ``key``."""
        for p in self.journal["parts"]:
            if p["key"] == key:
                return self.tmp / p["file"]
        raise KeyError(key)

    def set_journal(self, **entries: object) -> None:
        """Store JSON-ready ``entries`` in the journal (written with the next commit, or now)."""
        self.journal.update(entries)
        _atomic_write_text(self.tmp / JOURNAL, json.dumps(self.journal))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (moved to CPU, made contiguous) for the next :meth:`commit`; once the queue
        reaches ``max_shard_bytes`` it is committed on its own (as part ``auto-<n>``)."""
        t = tensor.detach().to("cpu").contiguous()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.max_shard_bytes:
            self.commit(f"auto-{len(self.journal['parts'])}")

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet committed."""
        return self._pending_bytes

    def commit(self, key: str, **journal: object) -> None:
        """Write the queued tensors as part ``key`` (whole or not at all) and record it, with ``journal``."""
        if self._pending:
            fname = f"part-{len(self.journal['parts']):05d}.safetensors"
            tmp = self.tmp / (fname + ".tmp")
            save_file(self._pending, str(tmp), metadata={"format": "pt"})
            tmp.chmod(0o666 & ~_umask())  # safetensors writes 0600 (a private temp file); use the user's umask
            os.replace(tmp, self.tmp / fname)
            self.journal["parts"].append({"key": key, "file": fname, "names": list(self._pending),
                                          "bytes": self._pending_bytes})
            self.journal["bytes"] += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0
        self.set_journal(**journal)

    def finish(self, config: dict, tokenizer: object | None, record: dict, source_dir: Path | None = None) -> Path:
        """Write config, tokenizer, run record; move the folder into place. Returns ``out_dir``."""
        if self._pending:
            self.commit("tail")
        parts = self.journal["parts"]
        if self.total_bytes <= self.max_shard_bytes:  # small: one file, as transformers writes it
            merged: dict[str, torch.Tensor] = {}
            for p in parts:
                merged.update(load_file(str(self.tmp / p["file"])))
            save_file(merged, str(self.tmp / "model.safetensors"), metadata={"format": "pt"})
            (self.tmp / "model.safetensors").chmod(0o666 & ~_umask())  # as in commit()
            del merged
            for p in parts:
                (self.tmp / p["file"]).unlink()
        else:
            n = len(parts)
            weight_map = {}
            for i, p in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / p["file"]).rename(self.tmp / final)
                weight_map.update({name: final for name in p["names"]})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.tmp / JOURNAL).unlink(missing_ok=True)
        for shard in self.tmp.glob("*.safetensors"):  # safetensors writes 0600 (a private temp file): umask instead
            shard.chmod(0o666 & ~_umask())
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
            shutil.copy(Path(source_dir) / "generation_config.json", self.tmp / "generation_config.json")
        (self.tmp / RUN_RECORD).write_text(json.dumps(record, indent=2))
        old = None
        if self.out_dir.exists():  # only reachable with force (checked in __init__)
            old = self.out_dir.parent / f".{self.out_dir.name}.replaced-{os.getpid()}"
            self.out_dir.rename(old)
        self.tmp.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir
