"""``marlin pack``: a model whose linear weights already lie on a symmetric 4-bit grid -> a quantized checkpoint
in any format of :data:`marlin_cli.formats.FORMATS` (``--format``).

Input: a Hugging Face model folder (fp16/bf16/fp32 weights, e.g. exported by a fake-quantizing tool) and a
safetensors file holding ``<linear name>.scales`` [out_features, groups] for every quantized linear
(groups = ceil(in_features / g), or 1 per channel). Each weight must equal ``(q - 8) * s`` for integer q in
0..15, up to the rounding of the weight's own dtype; otherwise the packing stops and names the worst element.
A scale may be negative (signed scales: the group's larger-magnitude side on the 16th level, ``q = 0``); a zero
scale stands for a group of zero weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS, LinearShape, marlin
from marlin_cli.formats.folder import CheckpointWriter, check_output_dir
from marlin_cli.pipeline.export import SERVED, check_fused, write_tensors
from marlin_cli.pipeline.models import arch_spec, resolve_model_dir
from marlin_cli.pipeline.weights import WeightStore
from marlin_cli.settings import QuantSettings

SOLVER_ONLY = ("damp", "clip", "clip_grid", "clip_max_shrink", "act_order", "dataset", "nsamples", "seqlen", "seed",
               "device", "true_sequential", "skip_gq", "nearest")
"""Settings that describe a quantizer run; ``pack`` runs none, so its ``quantization_config`` leaves them out."""

GRID_TOLERANCE = 0.02
"""Largest allowed distance of w / s from an integer, in grid steps. fp16 weights of magnitude up to 8 |s| are
rounded by at most 2^-11 * 8 = 0.004 steps; anything further is not on the grid."""


@dataclass
class _Codes:
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, G]


def codes_from_grid(name: str, w: torch.Tensor, s: torch.Tensor, group_size: int) -> _Codes:
    """Recover codes from fake-quantized weights W [N, K] and scales S [N, G] (any sign; 0 for a group of zeros);
    MarlinError if off the grid."""
    n, k = w.shape
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    if tuple(s.shape) != (n, groups):
        raise MarlinError(f"{name}: scales are {list(s.shape)} but a [{n}, {k}] weight with group size {group_size} "
                          f"needs [{n}, {groups}]")
    w = w.to(torch.float64)
    s = s.to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise MarlinError(f"{name}: scales must be finite")
    per = k if group_size == -1 else group_size
    s_full = s.repeat_interleave(per, dim=1)[:, :k]
    nonzero = s_full != 0  # negative scales are as valid as positive ones: W = (q - 8) * s either way
    safe = torch.where(nonzero, s_full, torch.ones_like(s_full))
    ratio = torch.where(nonzero, w / safe, torch.zeros_like(w))
    q = torch.round(ratio)
    off = (ratio - q).abs()
    off = torch.where(~nonzero & (w != 0), torch.full_like(off, float("inf")), off)
    worst = int(off.argmax())
    r, c = divmod(worst, k)
    if off.view(-1)[worst] > GRID_TOLERANCE:
        raise MarlinError(f"{name}: weight [{r}, {c}] = {w[r, c].item():.6g} is {off[r, c].item():.3g} grid steps "
                          f"off the 4-bit grid of scale {s_full[r, c].item():.6g}; these weights are not "
                          "fake-quantized with these scales (quantize the model with `marlin quantize` instead)")
    codes = q + 8
    bad = (codes < 0) | (codes > 15)
    if bool(bad.any()):
        idx = int(bad.view(-1).nonzero()[0])
        r, c = divmod(idx, k)
        raise MarlinError(f"{name}: weight [{r}, {c}] = {w[r, c].item():.6g} needs code {int(codes[r, c])}, outside "
                          f"0..15 for scale {s_full[r, c].item():.6g}; symmetric 4-bit covers (q - 8) * s for q in 0..15, "
                          "from -8 s to 7 s")
    return _Codes(codes.to(torch.uint8), s.to(torch.float32))


def pack_fake_quantized(model: Path | str, scales_file: Path, group_size: int, out: Path,
                        force: bool = False, format_name: str = "marlin") -> tuple[Path, int]:
    """Write a checkpoint in ``format_name`` from a fake-quantized model. Returns (folder, linears packed)."""
    settings = QuantSettings(group_size=group_size, format=format_name)  # checks the group size and format
    codec = FORMATS[format_name]
    out = Path(out)
    check_output_dir(out, force)
    model_dir = resolve_model_dir(str(model))
    if not Path(scales_file).is_file():
        raise MarlinError(f"scales file {scales_file} does not exist")
    try:
        scales = load_file(str(scales_file))
    except (SafetensorError, OSError) as err:
        raise MarlinError(f"could not read {scales_file} as safetensors: {err}") from err
    config = AutoConfig.from_pretrained(model_dir)
    arch_spec(config.model_type)
    store = WeightStore(model_dir)
    start = time.perf_counter()
    matrices: dict[str, _Codes] = {}
    for key in sorted(scales):
        if not key.endswith(".scales"):
            raise MarlinError(f"{scales_file}: entry '{key}' is not named '<linear name>.scales'")
        name = key[: -len(".scales")]
        if f"{name}.weight" not in store:
            raise MarlinError(f"{scales_file}: '{key}' names no linear of {model_dir} ({name}.weight is missing)")
        matrices[name] = codes_from_grid(name, store.get(f"{name}.weight"), scales[key], group_size)
    if not matrices:
        raise MarlinError(f"{scales_file} holds no '<linear name>.scales' entries")
    shapes = [LinearShape(name, m.codes.shape[1], m.codes.shape[0]) for name, m in matrices.items()]
    problems = codec.check(shapes, group_size)
    if problems:
        raise MarlinError(f"the {codec.NAME} format cannot hold this model: " + "; ".join(problems))
    if codec.NAME in SERVED:
        check_fused(set(matrices), {k[: -len(".weight")] for k in store.names() if k.endswith(".weight")}
                    - set(matrices), codec.NAME)
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = "float16"
    if codec is marlin:
        qc = marlin.quantization_config(settings, list(matrices))
        for key in SOLVER_ONLY:
            del qc[key]
        config_dict["quantization_config"] = {**qc, "method": "pack"}
    else:
        config_dict["quantization_config"] = codec.quantization_config(settings, list(matrices))
    record = {"source_model": str(model), "source_dir": str(model_dir), "scales_file": str(scales_file),
              "method": "pack", "group_size": group_size, "linears": len(matrices), "format": codec.NAME}
    with CheckpointWriter(out, force=force) as writer:
        write_tensors(writer, store, matrices, group_size, codec)
        record["seconds"] = round(time.perf_counter() - start, 2)
        out_dir = writer.finish(config_dict, AutoTokenizer.from_pretrained(model_dir), record, source_dir=model_dir)
    return out_dir, len(matrices)
