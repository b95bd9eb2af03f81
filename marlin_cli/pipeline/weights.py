"""Tensor-at-a-time access to a folder of safetensors shards, so a model is never held whole in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn

from marlin_cli.errors import MarlinError


def open_safetensors(path: Path):  # noqa: ANN201 - safetensors' safe_open handle
    """``safe_open(path)``, with a missing, truncated or corrupt file as a one-line :class:`MarlinError`.

    safetensors checks at open that the header parses and that its tensors cover the file exactly, so a
    file cut short (an interrupted download or copy) is caught here, before any tensor is read.
    """
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        size = Path(path).stat().st_size if Path(path).is_file() else None
        what = "missing" if size is None else f"{size} bytes"
        raise MarlinError(f"{path} is not a readable safetensors file ({what}: {str(err).strip()}); it is truncated "
                          "or corrupt: re-download or re-create it") from err


def check_safetensors(path: Path) -> None:
    """Raise a one-line :class:`MarlinError` if ``path`` is not a complete safetensors file (header check only)."""
    with open_safetensors(path):
        pass


def check_folder(model_dir: Path) -> None:
    """Check every ``*.safetensors`` file of a model folder (headers and sizes; no tensor data is read)."""
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        check_safetensors(shard)


class WeightStore:
    """Index of tensor name -> shard file for a Hugging Face model folder; tensors are read lazily (mmap)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: self.model_dir / f for name, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise MarlinError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err}); "
                                  "re-download or re-create the checkpoint") from err
            for shard in sorted(set(self.files.values())):
                check_safetensors(shard)
        else:
            shards = sorted(self.model_dir.glob("*.safetensors"))
            if not shards:
                raise MarlinError(f"{self.model_dir} has no .safetensors weights; convert the model to "
                                  "safetensors (transformers' save_pretrained does) and try again")
            self.files = {}
            for shard in shards:
                with open_safetensors(shard) as f:
                    self.files.update({name: shard for name in f.keys()})  # noqa: SIM118 - safe_open has no iterator

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        """Every tensor name in the folder."""
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype)."""
        if name not in self.files:
            raise MarlinError(f"tensor '{name}' is missing from {self.model_dir}; the checkpoint is incomplete")
        with open_safetensors(self.files[name]) as f:
            try:
                return f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                raise MarlinError(f"{self.files[name]}: cannot read tensor '{name}' ({err}); the file is corrupt or "
                                  "truncated: re-download or re-create the checkpoint") from err

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the shard's header (no data is read)."""
        if name not in self.files:
            raise MarlinError(f"tensor '{name}' is missing from {self.model_dir}; the checkpoint is incomplete")
        with open_safetensors(self.files[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def total_bytes(self) -> int:
        """Size on disk of all shard files."""
        return sum(p.stat().st_size for p in set(self.files.values()))

    def materialize(self, root: nn.Module, prefix: str, device: torch.device | str, dtype: torch.dtype | None) -> None:
        """Load every meta-device parameter and buffer of ``root.<prefix>`` that the folder holds.

        Tensors already loaded (not on the meta device) are left as they are.

        Floating tensors are cast to ``dtype`` (when given); integer tensors keep their dtype.
        """
        module = root.get_submodule(prefix) if prefix else root
        names = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        for name in names:
            full = f"{prefix}.{name}" if prefix else name
            if full not in self.files:
                continue
            value = self.get(full)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            # dtype= keeps the value's dtype; without it accelerate casts to the meta tensor's (config) dtype.
            set_module_tensor_to_device(module, name, device, value=value, dtype=value.dtype)
