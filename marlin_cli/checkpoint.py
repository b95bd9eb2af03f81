"""Marlin checkpoints on disk: written whole or not at all, and read back into a transformers model.

A checkpoint is a Hugging Face model folder:
- ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``): for each
  quantized linear ``<name>.qweight`` int32 [K_pad/16, 2*N_pad], ``<name>.scales`` fp16 [K_pad/g or 1, N_pad],
  ``<name>.shape`` int32 [2] (in, out features before padding), ``<name>.bias`` if any (layout in
  gptq/format.py); every other tensor (embeddings, norms, lm_head, unquantized projections) in fp16.
- ``config.json`` with ``quantization_config`` (see :func:`quantization_config`), tokenizer files,
  ``generation_config.json`` when the source had one, and ``marlin_run.json``, the record of the run.
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

QUANT_METHOD = "marlin"
FORMAT_VERSION = 1
RUN_RECORD = "marlin_run.json"


def quantization_config(group_size: int, method: str, modules: list[str], **extra: object) -> dict:
    """The ``quantization_config`` entry of config.json.

    Args:
        group_size: 32, 64, 128, or -1 per channel.
        method: "gptq" or "rtn" (round to nearest) or "pack" (packed from fake-quantized weights).
        modules: full names of the quantized linears (everything else is fp16).
        extra: further facts to record (damp, clip, ...).
    """
    return {"quant_method": QUANT_METHOD, "format": "marlin", "format_version": FORMAT_VERSION, "bits": 4,
            "group_size": group_size, "sym": True, "desc_act": False, "zero_point": 8, "method": method,
            "modules": sorted(modules), **extra}


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
        save_file(self._pending, str(self.tmp / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
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


def read_quantization_config(model_dir: Path) -> dict | None:
    """The Marlin ``quantization_config`` of a folder, or None for an unquantized model."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    qc = json.loads(cfg_path.read_text()).get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != QUANT_METHOD:
        raise MarlinError(f"{model_dir} is quantized with '{qc.get('quant_method')}', not Marlin; "
                          "convert it with `marlin pack` first")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise MarlinError(f"{model_dir} uses Marlin format version {qc['format_version']}, newer than this "
                          f"tool's {FORMAT_VERSION}; upgrade marlin")
    return qc


def load_quantized(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float16):  # noqa: ANN201
    """A transformers causal LM whose quantized linears are :class:`gptq.linear.MarlinLinear`.

    Tensors are read one at a time from the shards onto ``device``; floating tensors (scales included)
    become ``dtype``. Raises MarlinError when the folder is not a complete Marlin checkpoint.
    """
    from transformers import AutoConfig

    from gptq.linear import MarlinLinear
    from marlin_cli.models import arch_spec, meta_model, meta_tensors, rebuild_rotary
    from marlin_cli.weights import WeightStore

    model_dir = Path(model_dir)
    qc = read_quantization_config(model_dir)
    if qc is None:
        raise MarlinError(f"{model_dir} is not a Marlin checkpoint (no quantization_config in config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    spec = arch_spec(config.model_type)
    model = meta_model(config)
    store = WeightStore(model_dir)
    for name in qc["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        shape_name = f"{name}.shape"
        if shape_name not in store:
            raise MarlinError(f"{model_dir} lacks {shape_name}; the checkpoint is incomplete or not Marlin format")
        k, n = (int(v) for v in store.get(shape_name))
        if (k, n) != (linear.in_features, linear.out_features):
            raise MarlinError(f"{name}: checkpoint holds a {k}x{n} matrix but the config says "
                              f"{linear.in_features}x{linear.out_features}")
        setattr(parent, child, MarlinLinear(k, n, qc["group_size"], bias=f"{name}.bias" in store, device="meta"))
    store.materialize(model, "", device, None)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(dtype)
    rebuild_rotary(model, spec, device)  # after the cast: rotary frequencies stay float32, as from_pretrained leaves them
    missing = meta_tensors(model)
    if missing:
        raise MarlinError(f"{model_dir} is missing {len(missing)} tensors (first: {missing[0]}); re-create the checkpoint")
    return model.eval()
