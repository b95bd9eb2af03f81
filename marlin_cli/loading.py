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

from gptq.format import GROUP_SIZES
from gptq.linear import MarlinLinear
from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS, CodesLinear, PackedLinear
from marlin_cli.fuse import fuse_model
from marlin_cli.pipeline.models import (
    BUILTIN_ALIASES,
    arch_spec,
    meta_model,
    meta_tensors,
    rebuild_rotary,
    resolve_model_dir,
)
from marlin_cli.pipeline.weights import WeightStore, check_folder
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


def load_model(path_or_alias: str, device: str = "cpu", dtype: torch.dtype | None = None,
               fuse: bool | None = None) -> LoadedModel:
    """Load a model or quantized checkpoint (Marlin, compressed-tensors, GPTQ) by folder, hub id, or built-in
    alias onto ``device`` as ``dtype``.

    ``fuse``: a quantized model's q/k/v and gate/up become one Marlin matmul each
    (:func:`marlin_cli.fuse.fuse_model`); default: on CUDA, where it saves kernel launches and input reads."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    model_dir = resolve_model_dir(path_or_alias)
    check_folder(model_dir)  # a truncated or corrupt .safetensors is one line, not a traceback
    qc = read_quantization_config(model_dir)
    if qc is not None:
        model = load_quantized(model_dir, device=device, dtype=dtype)
        if device.startswith("cuda") if fuse is None else fuse:
            fuse_model(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    identity = {"model": path_or_alias, "path": str(model_dir), "alias": path_or_alias in BUILTIN_ALIASES,
                "is_quantized": qc is not None, "quantization_config": qc, "weights": weights_fingerprint(model_dir)}
    return LoadedModel(model, tokenizer, identity)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MarlinError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise MarlinError(f"{path} does not hold a JSON object")
    return data


def read_quantization_config(model_dir: Path) -> dict | None:
    """The ``quantization_config`` of a folder's config.json (or AutoGPTQ's ``quantize_config.json``), or None."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    qc = _read_json(cfg_path).get("quantization_config") or None
    legacy = Path(model_dir) / "quantize_config.json"
    if qc is None and legacy.is_file():  # older AutoGPTQ checkpoints keep it only there
        qc = {"quant_method": "gptq", **_read_json(legacy)}
    return qc


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
    codes, scales, group_size, perm = item.codes, item.scales, item.group_size, item.perm
    k = codes.shape[1]
    if item.g_idx is not None and perm is None:
        plain = torch.arange(k) // (k if group_size == -1 else group_size)
        if not torch.equal(item.g_idx.to(torch.long).cpu(), plain):
            perm = torch.argsort(item.g_idx.to(torch.long).cpu(), stable=True)
            if not torch.equal(item.g_idx.to(torch.long).cpu()[perm], plain):
                raise MarlinError(f"{item.name}: g_idx does not put exactly {group_size} input features in every "
                                  "group; this checkpoint cannot be served")
            codes = codes[:, perm]
    if group_size not in GROUP_SIZES:
        # Groups of 192 (or any multiple of 128, 64 or 32) are the same weight as groups of 128 / 64 / 32 that
        # share their scales: exact.
        target = next((t for t in sorted(GROUP_SIZES, reverse=True) if t > 0 and group_size > 0 and
                       group_size % t == 0), None)
        if target is None or k % group_size:
            raise MarlinError(f"{item.name}: group size {group_size}; the Marlin kernel here takes "
                              f"{', '.join(map(str, GROUP_SIZES))} or a multiple of 32")
        scales = scales.repeat_interleave(group_size // target, dim=1)
        group_size = target
    scale_dtype = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
    try:
        return MarlinLinear.from_codes(codes, scales, group_size, bias=bias, scale_dtype=scale_dtype,
                                       perm=perm).to(device)
    except ValueError as err:
        raise MarlinError(f"{item.name}: {err}") from err


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
        for leftover in ("weight",):  # a layer both packed and dense would be ambiguous
            if f"{item.name}.{leftover}" in store:
                raise MarlinError(f"{item.name}: the checkpoint holds both quantized tensors and a dense "
                                  f"'{item.name}.{leftover}'; it is malformed")
    store.materialize(model, "", device, None)  # every tensor still on the meta device
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(dtype)
    rebuild_rotary(model, spec, device)  # after the cast: rotary frequencies stay float32, as from_pretrained leaves them
    missing = meta_tensors(model)
    if missing:
        raise MarlinError(f"{model_dir} is missing {len(missing)} tensors (first: {missing[0]}); re-create the checkpoint")
    return model.eval()
