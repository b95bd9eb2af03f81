"""One function that turns a name into a working model: unquantized folders, hub ids, the built-in alias, and
Marlin checkpoints (whose quantized linears become :class:`gptq.linear.MarlinLinear`: the CUDA kernel on a
GPU, the reference product on the CPU)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from marlin_cli.checkpoint import load_quantized, read_quantization_config
from marlin_cli.errors import MarlinError
from marlin_cli.models import BUILTIN_ALIASES, resolve_model_dir

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


def default_dtype(device: str) -> torch.dtype:
    """float32 on the CPU (fp16 matmuls there are slow and inexact), float16 on a GPU."""
    return torch.float32 if device == "cpu" else torch.float16


def load_model(path_or_alias: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model or Marlin checkpoint by folder, hub id, or built-in alias onto ``device`` as ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MarlinError(f"--device {device}: no CUDA device is visible; use --device cpu")
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
