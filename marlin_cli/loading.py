"""Loading a model, in one place: unquantized folders, hub ids, the built-in alias, and quantized checkpoints.

A quantized checkpoint's ``quantization_config`` picks its format from :data:`marlin_cli.formats.FORMATS`;
the format's reader yields each quantized linear (Marlin-packed, or codes + scales that are packed here), and
the linear becomes :class:`gptq.linear.MarlinLinear`: the CUDA kernel on a GPU, the reference product on the CPU.
Everything else is read tensor by tensor from the shards into an empty (meta) model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq.linear import MarlinLinear
from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS, CodesLinear, PackedLinear
from marlin_cli.pipeline.models import (
    BUILTIN_ALIASES,
    arch_spec,
    meta_model,
    meta_tensors,
    rebuild_rotary,
    resolve_model_dir,
)
from marlin_cli.pipeline.weights import WeightStore
from marlin_cli.runtime import default_dtype, resolve_device

FULL_HASH_LIMIT = 2 << 30
"""Weight folders up to this size are hashed in full; larger ones by their safetensors headers and sizes."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and what identifies it (for result records)."""

    model: torch.nn.Module
    tokenizer: object
    identity: dict = field(default_factory=dict)


def weights_fingerprint(model_dir: Path) -> dict:
    """sha256 over the folder's .safetensors files (full content when small, headers + sizes when large)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    full = total <= FULL_HASH_LIMIT
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            if full:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                head = fh.read(8)
                h.update(head + fh.read(int.from_bytes(head, "little")) + str(f.stat().st_size).encode())
    return {"sha256": h.hexdigest(), "hashed": "content" if full else "headers", "bytes": total}


def load_model(path_or_alias: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model or Marlin checkpoint by folder, hub id, or built-in alias onto ``device`` as ``dtype``."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    model_dir = resolve_model_dir(path_or_alias)
    qc = read_quantization_config(model_dir)
    if qc is not None:
        model = load_quantized(model_dir, device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    identity = {"model": path_or_alias, "path": str(model_dir), "alias": path_or_alias in BUILTIN_ALIASES,
                "is_quantized": qc is not None, "quantization_config": qc, "weights": weights_fingerprint(model_dir)}
    return LoadedModel(model, tokenizer, identity)


def read_quantization_config(model_dir: Path) -> dict | None:
    """The ``quantization_config`` of a folder's config.json, or None for an unquantized model."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    return json.loads(cfg_path.read_text()).get("quantization_config") or None


def checkpoint_format(model_dir: Path, qc: dict) -> ModuleType:
    """The format module of :data:`marlin_cli.formats.FORMATS` that recognizes ``qc``; MarlinError if none."""
    for module in FORMATS.values():
        if module.recognizes(qc):
            return module
    raise MarlinError(f"{model_dir} is quantized with '{qc.get('quant_method')}', which this tool cannot load "
                      f"(it reads {', '.join(FORMATS)}); convert it with `marlin pack` first")


def _quantized_linear(item: PackedLinear | CodesLinear, bias: torch.Tensor | None, device: str) -> MarlinLinear:
    """A :class:`MarlinLinear` on ``device`` holding one linear read by a format."""
    if isinstance(item, PackedLinear):
        layer = MarlinLinear(item.in_features, item.out_features, item.group_size, bias=bias is not None,
                             dtype=item.scales.dtype)
        if tuple(item.qweight.shape) != tuple(layer.qweight.shape) or \
                tuple(item.scales.shape) != tuple(layer.scales.shape):
            raise MarlinError(f"{item.name}: packed tensors are {list(item.qweight.shape)} / {list(item.scales.shape)}"
                              f", expected {list(layer.qweight.shape)} / {list(layer.scales.shape)}")
        layer.qweight.copy_(item.qweight)
        layer.scales.copy_(item.scales)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.to(device)
    if item.g_idx is not None:
        k = item.codes.shape[1]
        plain = torch.arange(k) // (k if item.group_size == -1 else item.group_size)
        if not torch.equal(item.g_idx.to(torch.long).cpu(), plain):
            raise MarlinError(f"{item.name}: the checkpoint reorders input features into groups (act-order, "
                              "desc_act=True), which the Marlin kernel here does not support")
    return MarlinLinear.from_codes(item.codes, item.scales, item.group_size, bias=bias).to(device)


def load_quantized(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float16):  # noqa: ANN201
    """A transformers causal LM whose quantized linears are :class:`gptq.linear.MarlinLinear`.

    Tensors are read one at a time from the shards onto ``device``; floating tensors (scales included)
    become ``dtype``. Raises MarlinError when the folder is not a complete quantized checkpoint.
    """
    model_dir = Path(model_dir)
    qc = read_quantization_config(model_dir)
    if qc is None:
        raise MarlinError(f"{model_dir} is not a quantized checkpoint (no quantization_config in config.json)")
    codec = checkpoint_format(model_dir, qc)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    spec = arch_spec(config.model_type)
    model = meta_model(config)
    store = WeightStore(model_dir)
    for item in codec.read(store, qc):
        parent_name, _, child = item.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        k, n = (item.in_features, item.out_features) if isinstance(item, PackedLinear) else \
            (item.codes.shape[1], item.codes.shape[0])
        if (k, n) != (linear.in_features, linear.out_features):
            raise MarlinError(f"{item.name}: checkpoint holds a {k}x{n} matrix but the config says "
                              f"{linear.in_features}x{linear.out_features}")
        bias = store.get(f"{item.name}.bias") if f"{item.name}.bias" in store else None
        setattr(parent, child, _quantized_linear(item, bias, device))
    store.materialize(model, "", device, None)  # every tensor still on the meta device
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(dtype)
    rebuild_rotary(model, spec, device)  # after the cast: rotary frequencies stay float32, as from_pretrained leaves them
    missing = meta_tensors(model)
    if missing:
        raise MarlinError(f"{model_dir} is missing {len(missing)} tensors (first: {missing[0]}); re-create the checkpoint")
    return model.eval()
