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
from safetensors.torch import save_file

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


class CheckpointWriter:
    """Collects tensors into safetensors shards in a hidden temporary folder beside ``out_dir``.

    ``finish`` writes the metadata and renames the folder into place; leaving the ``with`` block by an
    exception (or Ctrl-C) removes the temporary folder, so no half checkpoint ever looks whole.
    """

    def __init__(self, out_dir: Path, force: bool = False, max_shard_bytes: int = 2 << 30) -> None:
        self.out_dir = Path(out_dir)
        self.force = force
        check_output_dir(self.out_dir, force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (moved to CPU, made contiguous); shards are flushed at ``max_shard_bytes``."""
        t = tensor.detach().to("cpu").contiguous()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        idx = len(self._shards)
        shard = self.tmp / f"shard-{idx:05d}.safetensors"
        save_file(self._pending, str(shard), metadata={"format": "pt"})
        shard.chmod(0o666 & ~_umask())  # safetensors writes 0600 (a private temp file); use the user's umask
        self._shards.append(list(self._pending))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def finish(self, config: dict, tokenizer: object | None, record: dict, source_dir: Path | None = None) -> Path:
        """Write config, tokenizer, run record; move the folder into place. Returns ``out_dir``."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            (self.tmp / "shard-00000.safetensors").rename(self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
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
