"""compressed-tensors ``pack-quantized``, symmetric int4 weight-only (W4A16): tensor codec and config.

This is the format llm-compressor writes and vLLM / SGLang serve (``CompressedTensorsWNA16``). Pure code:
no file I/O, and the ``compressed-tensors`` package is not needed at run time (the tests use it as the
oracle). Facts below were checked against compressed-tensors 0.20.1
(``compressors/pack_quantized/{base,helpers}.py``, ``quantization/quant_args.py``,
``compressors/model_compressors/model_compressor.py``), a checkpoint written by llm-compressor 0.14.0.1
(compressed-tensors 0.19.0) and vLLM's ``CompressedTensorsWNA16``.

Notation (``W`` is the layer weight [N, K], N = out_features, K = in_features, ``g`` the group size):

    code q[n, k] in 0..15,      W[n, k] = (q[n, k] - 8) * s[n, k // g]

Per linear layer the checkpoint holds

- ``weight_packed``  int32 [N, K / 8]: the library quantizes to signed int4 ``q - 8`` in [-8, 7], adds the
  offset 8 back before packing (``pack_to_int32``), so the stored nibble is exactly our code ``q``;
  8 consecutive k per int32, value i at bits 4i..4i+3 (lowest first).
- ``weight_scale``   [N, K / g] (per channel: [N, 1]) in the model dtype. Negative scales are stored as is.
- ``weight_shape``   int64 [2] = (N, K).
- ``weight_g_idx``   int32 [K], only for ``actorder: "group"`` checkpoints (group of input column k);
  no zero point when symmetric.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from marlin_cli.errors import MarlinError
from marlin_cli.formats.base import CodesLinear, LinearShape, QuantizedLinear, TensorSource, summarize

if TYPE_CHECKING:  # settings imports the format registry, which imports this module
    from marlin_cli.settings import QuantSettings

__all__ = [
    "CT_VERSION",
    "CTScheme",
    "decode_tensors",
    "encode_tensors",
    "parse_config",
    "build_config",
    "which_layers_fail",
]

CT_VERSION = "0.19.0"
"""The compressed-tensors release whose config.json output :func:`build_config` reproduces (the one
llm-compressor 0.14.0.1 pins)."""

ZERO_CODE = 8
"""Symmetric int4: code 8 dequantizes to 0 (the library's signed value ``q - 8``)."""
PACK = 8
"""4-bit values per int32."""

_SHIFTS = torch.arange(PACK, dtype=torch.int64) * 4


@dataclass(frozen=True)
class CTScheme:
    """What a compressed-tensors ``quantization_config`` says about the quantized linears.

    Attributes:
        bits: always 4 (anything else is refused by :func:`parse_config`).
        group_size: rows of K per scale, or -1 for one scale per output channel.
        symmetric: always True (asymmetric checkpoints are refused).
        act_order: True when the layers carry ``weight_g_idx`` (``actorder: "group"``).
        targets: the config group's targets (e.g. ``["Linear"]``).
        ignore: layers left dense (e.g. ``["lm_head"]``).
    """

    bits: int
    group_size: int
    symmetric: bool
    act_order: bool
    targets: tuple[str, ...]
    ignore: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes uint8 [R, C] (values 0..15, C % 8 == 0) along C into int32 [R, C / 8], value i at bits 4i."""
    r, c = codes.shape
    if c % PACK:
        raise ValueError(f"cannot pack {c} columns: not a multiple of {PACK}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("4-bit codes must lie in 0..15")
    words = (codes.to(torch.int64).reshape(r, c // PACK, PACK) << _SHIFTS).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 [R, W] -> codes uint8 [R, 8 W]."""
    r, w = packed.shape
    nib = (packed.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xF
    return nib.reshape(r, w * PACK).to(torch.uint8)


def _check_codes_scales(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    if codes.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"codes and scales must be 2-D, got {tuple(codes.shape)} and {tuple(scales.shape)}")
    n, k = codes.shape
    if group_size == -1:
        groups = 1
    elif group_size > 0:
        if k % group_size:
            raise ValueError(f"K = {k} is not a multiple of the group size {group_size}")
        groups = k // group_size
    else:
        raise ValueError(f"group size must be positive or -1, got {group_size}")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be [{n}, {groups}] for codes [{n}, {k}], got {tuple(scales.shape)}")
    return n, k, groups


def encode_tensors(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """One linear layer to its ``pack-quantized`` tensors.

    Args:
        codes: uint8 (or any integer dtype) [N, K], values 0..15; W = (q - 8) * s.
        scales: float [N, K / g], or [N, 1] per channel (``group_size == -1``). Negative values allowed.
        group_size: g > 0 dividing K, or -1 for per-channel.
        dtype: dtype of ``weight_scale`` (the model dtype); scales are cast to it.

    Returns:
        ``{"weight_packed": int32 [N, K/8], "weight_scale": dtype [N, G], "weight_shape": int64 [2] = (N, K)}``.
    """
    n, k, _ = _check_codes_scales(codes, scales, group_size)
    return {
        "weight_packed": pack_int4(codes).contiguous(),
        "weight_scale": scales.to(dtype).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def decode_tensors(
    tensors: dict[str, torch.Tensor], name: str = "layer", group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's ``pack-quantized`` tensors back to codes and scales (exact inverse of :func:`encode_tensors`).

    Args:
        tensors: ``weight_packed`` int32 [N, K/8], ``weight_scale`` [N, G], ``weight_shape`` [2] and, for
            act-order checkpoints, ``weight_g_idx`` int32 [K]. A ``weight_zero_point`` (asymmetric) is refused.
        name: the layer, named in errors.
        group_size: the config's group size (-1 per channel), checked against the shapes when given.

    Returns:
        ``(codes, scales, perm)``: codes uint8 [N, K] (0..15), scales [N, G] as stored, and ``perm`` None,
        or for act-order (non-monotone ``weight_g_idx``) an int64 [K] permutation with
        ``codes[:, j]`` = original column ``perm[j]`` and group ``j // g``: y = x[:, perm] @ W_sorted^T.

    Raises:
        MarlinError: one line naming the layer and the tensor that is missing, malformed or unsupported.
    """
    if "weight_zero_point" in tensors:
        raise MarlinError(f"{name}: weight_zero_point present (asymmetric zero points); only symmetric int4 "
                          "is supported")
    for key in ("weight_packed", "weight_scale"):
        if key not in tensors:
            raise MarlinError(f"{name}: {key} missing (not a pack-quantized layer)")
    packed, scales = tensors["weight_packed"], tensors["weight_scale"]
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise MarlinError(f"{name}: weight_packed must be a 2-D int32 tensor, got {packed.dtype} "
                          f"{tuple(packed.shape)} (not 4-bit pack-quantized)")
    if scales.dim() == 1:
        scales = scales.unsqueeze(1)
    if not scales.is_floating_point() or scales.dim() != 2:
        raise MarlinError(f"{name}: weight_scale must be a 2-D float tensor, got {scales.dtype} "
                          f"{tuple(scales.shape)}")
    n, k = packed.shape[0], packed.shape[1] * PACK
    if "weight_shape" in tensors:
        shape = [int(v) for v in tensors["weight_shape"].reshape(-1).tolist()]
        if shape != [n, k]:
            raise MarlinError(f"{name}: weight_shape {shape} does not match weight_packed {tuple(packed.shape)} "
                              f"(expected [{n}, {k}]; K must be a multiple of 8)")
    groups = scales.shape[1]
    if scales.shape[0] != n or groups < 1 or k % groups:
        raise MarlinError(f"{name}: weight_scale {tuple(scales.shape)} does not fit weight [{n}, {k}]")
    g = -1 if groups == 1 else k // groups
    if group_size is not None and group_size != g and not (groups == 1 and group_size == k):
        raise MarlinError(f"{name}: weight_scale {tuple(scales.shape)} implies group size {g}, the config says "
                          f"{group_size}")
    codes = unpack_int4(packed)
    perm = None
    if "weight_g_idx" in tensors:
        perm = act_order_perm(tensors["weight_g_idx"], k, groups, name, "weight_g_idx")
        if perm is not None:
            codes = codes[:, perm]
    return codes, scales, perm


def act_order_perm(g_idx: torch.Tensor, k: int, groups: int, name: str, field: str) -> torch.Tensor | None:
    """The permutation that sorts a ``g_idx`` [K] (group of each input column), or None if already sorted.

    The sort is stable, and sorted ``g_idx`` must be ``arange(K) // (K / groups)`` (every group exactly g
    columns), so that the scales keep their order; otherwise a one-line MarlinError naming layer and field.
    """
    g_idx = g_idx.reshape(-1).to(torch.int64)
    if g_idx.numel() != k:
        raise MarlinError(f"{name}: {field} has {g_idx.numel()} entries, expected K = {k}")
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise MarlinError(f"{name}: {field} values outside 0..{groups - 1}")
    expected = torch.arange(k, dtype=torch.int64) // (k // groups)
    if torch.equal(g_idx, expected):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        raise MarlinError(f"{name}: {field} does not give every group exactly {k // groups} input columns")
    return perm


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def build_config(
    group_size: int,
    ignore: list[str] | tuple[str, ...] = ("lm_head",),
    targets: list[str] | tuple[str, ...] = ("Linear",),
    actorder: str | None = None,
    observer: str | None = "memoryless_minmax",
    version: str = CT_VERSION,
) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json, as llm-compressor writes it for symmetric W4A16.

    Field for field what llm-compressor 0.14.0.1 (with its pinned compressed-tensors 0.19.0) wrote for
    ``QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])`` here: ``version``,
    ``quant_method``, empty ``sparsity_config`` / ``transform_config``, then ``QuantizationConfig.model_dump()``
    with explicit nulls (``actorder``, ``block_structure``, ``scale_dtype``, ``zp_dtype``). Newer
    compressed-tensors (0.20) leaves those nulls out and adds ``moe_sparsity_config: null``; both parse the same.
    llm-compressor writes config.json with ``json.dump(..., indent=2, sort_keys=True)``.

    Args:
        group_size: g > 0 (strategy ``group``) or -1 (strategy ``channel``, ``group_size`` null).
        ignore: module names left dense.
        targets: the config group's targets.
        actorder: None, or ``"weight"`` (act-order during calibration only; same tensors). ``"group"`` needs
            ``weight_g_idx`` tensors and is refused here (removed from compressed-tensors 0.20).
        observer: informational for a compressed checkpoint (used only to re-calibrate); llm-compressor's
            default for weights is ``"memoryless_minmax"``.
        version: the ``version`` field (the compressed-tensors release that wrote it).
    """
    if group_size == -1:
        strategy, gs = "channel", None
    elif group_size > 0:
        strategy, gs = "group", group_size
    else:
        raise ValueError(f"group size must be positive or -1, got {group_size}")
    if actorder not in (None, "weight"):
        raise ValueError(f"actorder {actorder!r} cannot be written; use None or 'weight'")
    weights: dict[str, Any] = {
        "actorder": actorder,
        "block_structure": None,
        "dynamic": False,
        "group_size": gs,
        "num_bits": 4,
        "observer": observer,
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": True,
        "type": "int",
        "zp_dtype": None,
    }
    return {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": list(targets),
                "weights": weights,
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


_ACTORDER_NONE = (None, False, "weight", "static")
_ACTORDER_GROUP = (True, "group", "dynamic")


def _parse_weights(w: Any, at: str) -> tuple[int, bool]:
    """Validate one group's ``weights`` args; return (group_size, act_order)."""
    if not isinstance(w, dict):
        raise MarlinError(f"{at}: no weight quantization (weights is {w!r})")
    qtype = str(w.get("type", "int")).lower()
    if qtype != "int":
        raise MarlinError(f"{at}.type is {qtype!r} (FP8/FP4 weights); only int4 is supported")
    bits = w.get("num_bits", 8)
    if bits != 4:
        raise MarlinError(f"{at}.num_bits is {bits}; only 4-bit weights are supported")
    if w.get("symmetric", True) is not True:
        raise MarlinError(f"{at}.symmetric is false (asymmetric zero points); only symmetric int4 is supported")
    if w.get("dynamic", False) not in (False, None):
        raise MarlinError(f"{at}.dynamic is {w.get('dynamic')!r}; only static weight scales are supported")
    gs = w.get("group_size")
    strategy = w.get("strategy")
    if strategy is None:  # the library infers it from group_size
        strategy = "tensor" if gs is None else "group" if gs > 0 else "channel"
    strategy = str(strategy).lower()
    if strategy == "group":
        if not isinstance(gs, int) or gs <= 0:
            raise MarlinError(f"{at}.group_size is {gs!r} with strategy group; expected a positive integer")
        group_size = gs
    elif strategy == "channel":
        if gs not in (None, -1):
            raise MarlinError(f"{at}.group_size is {gs!r} with strategy channel; expected null")
        group_size = -1
    else:
        raise MarlinError(f"{at}.strategy is {strategy!r}; only 'group' and 'channel' are supported")
    if w.get("block_structure") is not None:
        raise MarlinError(f"{at}.block_structure is set (block quantization); not supported")
    actorder = w.get("actorder")
    if isinstance(actorder, str):
        actorder = actorder.lower()
    if actorder in _ACTORDER_NONE:
        act_order = False
    elif actorder in _ACTORDER_GROUP:
        act_order = group_size != -1  # one group per channel: the order does not matter
    else:
        raise MarlinError(f"{at}.actorder is {actorder!r}; expected null, 'weight' or 'group'")
    return group_size, act_order


def parse_config(qc: dict[str, Any], where: str) -> CTScheme:
    """Read a compressed-tensors ``quantization_config`` dict; refuse what our kernel cannot serve exactly.

    Args:
        qc: the ``quantization_config`` entry of config.json.
        where: the file it came from, named in errors.

    Returns:
        The :class:`CTScheme` of its (single) weight scheme.

    Raises:
        MarlinError: one line naming ``where`` and the field, for anything but symmetric int4 group/channel
        weight-only ``pack-quantized``: asymmetric zero points, num_bits != 4, float (FP8/FP4) types,
        activation or KV-cache quantization, 2:4 sparsity, transforms, per-tensor/block strategies.
    """
    base = f"{where}: quantization_config"
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise MarlinError(f"{base}.quant_method is {method!r}, expected 'compressed-tensors'")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")) != "dense":
        raise MarlinError(f"{base}.sparsity_config has format {sparsity.get('format')!r} (2:4 sparse); "
                          "not supported")
    if qc.get("transform_config"):
        raise MarlinError(f"{base}.transform_config is set (rotated weights); not supported")
    if qc.get("kv_cache_scheme") is not None:
        raise MarlinError(f"{base}.kv_cache_scheme is set (KV-cache quantization); not supported")
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise MarlinError(f"{base}.format is {fmt!r}; only 'pack-quantized' is supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise MarlinError(f"{base}.quantization_status is {status!r}; expected 'compressed' (packed weights)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise MarlinError(f"{base}.config_groups is missing or empty")
    parsed: list[tuple[int, bool]] = []
    targets: list[str] = []
    for gname, scheme in groups.items():
        at = f"{base}.config_groups.{gname}"
        if not isinstance(scheme, dict):
            raise MarlinError(f"{at} is a preset name list {scheme!r}; expected an explicit scheme")
        for act in ("input_activations", "output_activations"):
            if scheme.get(act) is not None:
                raise MarlinError(f"{at}.{act} is set (activation quantization); only weight-only W4A16 "
                                  "is supported")
        sfmt = scheme.get("format")
        if sfmt not in (None, "pack-quantized"):
            raise MarlinError(f"{at}.format is {sfmt!r}; only 'pack-quantized' is supported")
        parsed.append(_parse_weights(scheme.get("weights"), f"{at}.weights"))
        targets.extend(scheme.get("targets") or [])
    if len(set(parsed)) > 1:
        raise MarlinError(f"{base}.config_groups: groups with different weight schemes {sorted(set(parsed))}; "
                          "only one scheme per checkpoint is supported")
    group_size, act_order = parsed[0]
    return CTScheme(bits=4, group_size=group_size, symmetric=True, act_order=act_order,
                    targets=tuple(targets), ignore=tuple(qc.get("ignore") or ()))


def which_layers_fail(shapes: dict[str, tuple[int, int]], group_size: int) -> list[str]:
    """Layers that cannot be written as ``pack-quantized`` with this group size, one line each.

    Args:
        shapes: layer name -> (K, N) = (in_features, out_features).
        group_size: g > 0 or -1.

    Returns:
        ``"name: K = 576 is not a multiple of the group size 128"``-style problems; empty if all can be written.
    """
    problems = []
    for name, (k, _n) in shapes.items():
        if k % PACK:
            problems.append(f"{name}: K = {k} is not a multiple of 8 (int4 packing into int32)")
        elif group_size != -1 and k % group_size:
            problems.append(f"{name}: K = {k} is not a multiple of the group size {group_size}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# The format interface (marlin_cli.formats)
# ---------------------------------------------------------------------------------------------------------

NAME = "compressed-tensors"
LAYER_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_g_idx", "weight_zero_point")


def fix_hint(shapes: Sequence[LinearShape], fail: Any, fmt_name: str) -> str:
    """What to do when ``fail(shapes, g)`` finds problems: the group sizes that would work, or ``--format marlin``."""
    from gptq.format import GROUP_SIZES

    table = {s.name: (s.in_features, s.out_features) for s in shapes}
    ok = [str(g) for g in GROUP_SIZES if not fail(table, g)]
    other = f"use --group-size {' or '.join(ok)}, or " if ok else "use "
    return (f"{other}--format marlin (pads any shape; read by this tool, not by vLLM or SGLang); "
            "nothing was written")


def check(shapes: Sequence[LinearShape], group_size: int) -> list[str]:
    """Linears this format cannot hold at this group size (K not a multiple of 8 or of g), and what to do."""
    problems = which_layers_fail({s.name: (s.in_features, s.out_features) for s in shapes}, group_size)
    return summarize(problems, fix_hint(shapes, which_layers_fail, NAME)) if problems else []


def encode(linear: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``<name>.weight_packed`` / ``.weight_scale`` (fp16) / ``.weight_shape`` for one quantized linear."""
    tensors = encode_tensors(linear.codes, linear.scales, linear.group_size, dtype=torch.float16)
    return {f"{linear.name}.{key}": value for key, value in tensors.items()}


def quantization_config(settings: QuantSettings, modules: Sequence[str]) -> dict[str, Any]:
    """llm-compressor's W4A16 entry for the run's group size: every ``Linear`` quantized except ``lm_head``.

    Every decoder linear is quantized (``--skip-gq`` is refused for this format by the settings), and
    embeddings / lm_head stay dense, so ``targets: ["Linear"]`` with ``ignore: ["lm_head"]`` is exact."""
    return build_config(settings.group_size)


def recognizes(qc: dict) -> bool:
    """True for a compressed-tensors ``quantization_config``."""
    return qc.get("quant_method") == "compressed-tensors"


def read(source: TensorSource, qc: dict) -> Iterator[CodesLinear]:
    """Codes and scales of every ``pack-quantized`` linear (act-order layers sorted, with their permutation)."""
    from marlin_cli.formats.base import read_codes  # one read loop for the codes + scales formats

    return read_codes(source, qc, label="compressed-tensors", marker="weight_packed", layer_tensors=LAYER_TENSORS,
                      parse_config=parse_config,
                      decode=lambda tensors, layer, scheme: decode_tensors(tensors, layer, scheme.group_size))
