"""GPTQ and compressed-tensors checkpoints as *other tools* write them, built by code independent of ours.

Written from the formats' published descriptions, not with ``marlin_cli.formats``:

- GPTQ (AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack``): ``qweight`` int32 [K/8, N], row i holds input rows
  8i..8i+7 of one column, row 8i+j at bits 4j; ``qzeros`` int32 [G, N/8] packs the zero point along N the
  same way, storing ``zero - 1`` (v1, ``checkpoint_format: gptq``) or ``zero`` (v2, GPTQModel's
  ``gptq_v2``); ``scales`` fp16 [G, N]; ``g_idx`` int32 [K], the group of each input row. With act-order
  (``desc_act``) the rows are quantized in a permuted order and ``g_idx[perm[i]] = i // g``.
- compressed-tensors ``pack-quantized`` (``pack_to_int32``): ``weight_packed`` int32 [N, K/8], 8 consecutive
  input columns per word, column 8i+j at bits 4j, holding the signed value + 8; ``weight_scale`` [N, G];
  ``weight_shape`` int64 (N, K); ``weight_g_idx`` int32 [K] for ``actorder: group``.

The quantization is plain round to nearest with absmax scales; the dense weight each layer stands for is
returned too, so a test can compare the loader's model with the dense dequantized model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def rtn(w: torch.Tensor, g: int, order: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round w [N, K] to nearest: (q uint32 [N, K] in 0..15, scales float16 [N, G], g_idx int32 [K]).

    ``order``: the act-order quantization order of the input rows (None: natural), so ``g_idx[order[i]] = i // g``.
    """
    w = w.double().numpy()
    n, k = w.shape
    per = k if g == -1 else g
    order_np = np.arange(k) if order is None else order.numpy()
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order_np] = np.arange(k) // per
    groups = k // per
    scales = np.empty((n, groups), dtype=np.float16)
    for j in range(groups):
        cols = g_idx == j
        scales[:, j] = np.maximum(np.abs(w[:, cols]).max(axis=1) / 7.5, 1e-4).astype(np.float16)
    s_full = scales.astype(np.float64)[:, g_idx]
    q = np.clip(np.round(w / s_full) + 8, 0, 15).astype(np.uint32)
    return q, scales, g_idx


def dense_of(q: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> torch.Tensor:
    """W = (q - 8) * s[:, g_idx], float32 [N, K] (what every client computes for symmetric 4-bit)."""
    return torch.from_numpy((q.astype(np.float64) - 8) * scales.astype(np.float64)[:, g_idx]).float()


def _to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def gptq_tensors(q: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, zeros_v2: bool) -> dict[str, torch.Tensor]:
    """AutoGPTQ's pack loop: qweight [K/8, N], qzeros [G, N/8], scales [G, N] fp16, g_idx [K]."""
    intweight = q.T.astype(np.uint32)  # [K, N]
    k, n = intweight.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    groups = scales.shape[1]
    zeros = np.full((groups, n), 8 if zeros_v2 else 8 - 1, dtype=np.uint32)
    qzeros = np.zeros((groups, n // 8), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros),
            "scales": torch.from_numpy(scales.T.copy()), "g_idx": torch.from_numpy(g_idx.copy())}


def ct_tensors(q: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, act_order: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors' pack_to_int32 along K: weight_packed [N, K/8], weight_scale [N, G], weight_shape."""
    n, k = q.shape
    signed = q.astype(np.int64) - 8  # what the library quantizes to; pack_to_int32 adds the offset 8 back
    unsigned = (signed + 8).astype(np.uint32)
    packed = np.zeros((n, k // 8), dtype=np.uint32)
    for j in range(8):
        packed |= unsigned[:, j::8] << (4 * j)
    out = {"weight_packed": _to_int32(packed), "weight_scale": torch.from_numpy(scales.copy()),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if act_order:
        out["weight_g_idx"] = torch.from_numpy(g_idx.copy())
    return out


def gptq_config(g: int, desc_act: bool, zeros_v2: bool, **extra: object) -> dict:
    """What AutoGPTQ (v1) or GPTQModel (v2, ``format: gptq_v2``) put under quantization_config."""
    config = {"bits": 4, "group_size": g, "damp_percent": 0.01, "desc_act": desc_act, "static_groups": False,
              "sym": True, "true_sequential": True, "quant_method": "gptq"}
    config.update({"format": "gptq_v2"} if zeros_v2 else {"checkpoint_format": "gptq"})
    config.update(extra)
    return config


def ct_config(g: int, act_order: bool, **weights: object) -> dict:
    """llm-compressor's W4A16 quantization_config (group or channel strategy)."""
    args = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "channel" if g == -1 else "group", "group_size": None if g == -1 else g,
            "actorder": "group" if act_order else None, "observer": "minmax"}
    args.update(weights)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
                                                                  "input_activations": None,
                                                                  "output_activations": None,
                                                                  "format": "pack-quantized"}},
            "kv_cache_scheme": None, "sparsity_config": {}, "version": "0.12.2"}


def write_checkpoint(source: Path, out: Path, fmt: str, g: int, act_order: bool = False, zeros_v2: bool = False,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Quantize every decoder linear of the model folder ``source`` and write ``out`` in ``fmt`` ("gptq" or
    "compressed-tensors"), as another tool would. Returns the dense weight each quantized linear stands for."""
    tensors = load_file(source / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    dense = {}
    out.mkdir(parents=True)
    for name in list(tensors):
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or not module.endswith(LINEARS):
            continue
        w = tensors.pop(name).float()
        order = torch.randperm(w.shape[1], generator=gen) if act_order else None
        q, scales, g_idx = rtn(w, g, order)
        dense[module] = dense_of(q, scales, g_idx)
        layer = gptq_tensors(q, scales, g_idx, zeros_v2) if fmt == "gptq" else ct_tensors(q, scales, g_idx,
                                                                                            act_order)
        tensors.update({f"{module}.{key}": value for key, value in layer.items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = (gptq_config(g, act_order, zeros_v2) if fmt == "gptq"
                                     else ct_config(g, act_order))
    (out / "config.json").write_text(json.dumps(config))
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, out / f.name)
    return dense


def dense_model(source: Path, dense: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The source model in float32 with each quantized linear's weight replaced by its dense dequantized value."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, w in dense.items():
            model.get_submodule(module).weight.copy_(w)
    return model
