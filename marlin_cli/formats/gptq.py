"""GPTQ (AutoGPTQ / GPTQModel) symmetric int4 checkpoints: tensor codec and config.

Pure code: no file I/O and no GPTQ library at run time. Facts checked against AutoGPTQ
(``auto_gptq/nn_modules/qlinear/qlinear_cuda.py`` and ``qlinear_cuda_old.py``: ``__init__``, ``pack``,
the torch forward; ``auto_gptq/quantization/config.py``: ``BaseQuantizeConfig.to_dict``), GPTQModel
(``gptqmodel/utils/model.py``: ``convert_gptq_v1_to_v2_format_module`` adds 0x11111111 to every 4-bit
``qzeros`` word; ``gptqmodel/quantization/config.py``) and vLLM's ``gptq_marlin.py`` / ``marlin_utils.py``.

Notation (``W`` [N, K] is the layer weight, N = out_features, K = in_features, ``g`` the group size):

    code q[n, k] in 0..15,      W[n, k] = (q[n, k] - z) * s[n, g_idx[k]]

Per linear layer (``B = W^T`` orientation, [K, N]):

- ``qweight`` int32 [K / 8, N]: 8 consecutive k of one column per int32, value i at bits 4i..4i+3.
- ``scales``  [G, N] (fp16 in AutoGPTQ; the model dtype in GPTQModel), G = K / g, or 1 per channel.
- ``qzeros``  int32 [G, N / 8]: the zero point packed along N. Symmetric quantization has z = 8; the
  original (v1, ``checkpoint_format: gptq``) layout stores z - 1 = 7 in every nibble (0x77777777) and
  adds 1 back when reading; GPTQModel's v2 (``gptq_v2``) stores z = 8 (0x88888888).
- ``g_idx``   int32 [K]: group of input row k; ``arange(K) // g`` unless act-order (``desc_act``), where it
  is non-monotone. vLLM sorts it once (``marlin_sort_g_idx``), permutes the weight rows at load and gathers
  the activation columns at run time; :func:`decode_tensors` returns that permutation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from marlin_cli.errors import MarlinError
from marlin_cli.formats.base import CodesLinear, LinearShape, QuantizedLinear, TensorSource, summarize
from marlin_cli.formats.compressed_tensors import act_order_perm, pack_int4, unpack_int4

if TYPE_CHECKING:  # settings imports the format registry, which imports this module
    from marlin_cli.settings import QuantSettings

__all__ = [
    "GPTQScheme",
    "decode_tensors",
    "encode_tensors",
    "parse_config",
    "build_config",
    "which_layers_fail",
    "ZERO_WORD",
]

ZeroFormat = Literal["v1", "v2"]

ZERO_CODE = 8
"""The symmetric zero point of 4-bit GPTQ: (maxq + 1) / 2."""
ZERO_NIBBLE = {"v1": ZERO_CODE - 1, "v2": ZERO_CODE}
"""What each ``qzeros`` nibble holds for a symmetric layer."""
ZERO_WORD = {"v1": 0x77777777, "v2": 0x88888888 - 2**32}
"""One ``qzeros`` int32 word of a symmetric layer, as a signed int32 value."""
CHECKPOINT_FORMAT = {"v1": "gptq", "v2": "gptq_v2"}


@dataclass(frozen=True)
class GPTQScheme:
    """What a GPTQ ``quantization_config`` says.

    Attributes:
        bits: always 4.
        group_size: rows of K per scale, or -1 for one scale per output channel.
        desc_act: act-order; layers carry a non-monotone ``g_idx`` (irrelevant per channel).
        sym: always True (asymmetric checkpoints are refused).
        zero_format: ``"v1"`` (``checkpoint_format``/``format`` ``gptq`` or absent) or ``"v2"`` (``gptq_v2``).
    """

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    zero_format: ZeroFormat


def _check_zero_format(zero_format: str) -> None:
    if zero_format not in ZERO_NIBBLE:
        raise ValueError(f"zero_format must be 'v1' or 'v2', got {zero_format!r}")


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------


def encode_tensors(
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    zero_format: ZeroFormat = "v1",
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """One linear layer to its GPTQ tensors (no act-order).

    Args:
        codes: uint8 (or any integer dtype) [N, K], values 0..15; W = (q - 8) * s.
        scales: float [N, G] with G = K / g, or [N, 1] per channel (``group_size == -1``). Negative values
            allowed (stored as they are; AutoGPTQ's, GPTQModel's and vLLM's dequantization multiply by them).
        group_size: g > 0 dividing K, or -1.
        zero_format: ``"v1"`` stores zero - 1 = 7 per ``qzeros`` nibble, ``"v2"`` stores 8.
        dtype: dtype of ``scales`` (AutoGPTQ and vLLM's GPTQ loaders: fp16; or the model dtype).

    Returns:
        ``{"qweight": int32 [K/8, N], "scales": dtype [G, N], "qzeros": int32 [G, N/8],
        "g_idx": int32 [K] = arange(K) // g (zeros per channel)}``.
    """
    _check_zero_format(zero_format)
    if codes.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"codes and scales must be 2-D, got {tuple(codes.shape)} and {tuple(scales.shape)}")
    n, k = codes.shape
    if group_size == -1:
        groups = 1
    elif group_size > 0 and k % group_size == 0:
        groups = k // group_size
    else:
        raise ValueError(f"group size {group_size} does not divide K = {k}")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be [{n}, {groups}] for codes [{n}, {k}], got {tuple(scales.shape)}")
    if n % 8:
        raise ValueError(f"N = {n} is not a multiple of 8 (qzeros packs 8 columns per int32)")
    g_idx = torch.zeros(k, dtype=torch.int32) if group_size == -1 else torch.arange(k, dtype=torch.int32) // group_size
    return {
        "qweight": pack_int4(codes).t().contiguous(),
        "scales": scales.t().to(dtype).contiguous(),
        "qzeros": torch.full((groups, n // 8), ZERO_WORD[zero_format], dtype=torch.int32),
        "g_idx": g_idx,
    }


def decode_tensors(
    tensors: dict[str, torch.Tensor],
    group_size: int,
    zero_format: ZeroFormat = "v1",
    sym: bool = True,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's GPTQ tensors back to codes and scales, checking the zero points are the symmetric ones.

    Args:
        tensors: ``qweight`` int32 [K/8, N], ``scales`` [G, N], ``qzeros`` int32 [G, N/8], optional ``g_idx``
            int32 [K] (absent in some old checkpoints: taken as ``arange(K) // g``).
        group_size: the config's g, or -1.
        zero_format: ``"v1"`` (qzeros nibble = 7) or ``"v2"`` (8), from :func:`parse_config`.
        sym: the config's ``sym``; False is refused.
        name: the layer, named in errors.

    Returns:
        ``(codes, scales, perm)``: codes uint8 [N, K], scales [N, G] (stored dtype), and ``perm`` None, or
        for act-order an int64 [K] permutation that sorts ``g_idx``; then ``codes[:, j]`` is original
        input column ``perm[j]`` and belongs to group ``j // g``, so y = x[:, perm] @ W_sorted^T.

    Raises:
        MarlinError: one line naming the layer and tensor: missing/malformed tensors, asymmetric or
        v1/v2-mismatched zero points, a ``g_idx`` that is not a grouping into equal groups.
    """
    _check_zero_format(zero_format)
    if not sym:
        raise MarlinError(f"{name}: sym is false (asymmetric zero points); only symmetric int4 is supported")
    for key in ("qweight", "scales", "qzeros"):
        if key not in tensors:
            raise MarlinError(f"{name}: {key} missing (not a GPTQ layer)")
    qweight, scales, qzeros = tensors["qweight"], tensors["scales"], tensors["qzeros"]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise MarlinError(f"{name}: qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if not scales.is_floating_point() or scales.dim() != 2 or scales.shape[1] != n:
        raise MarlinError(f"{name}: scales {scales.dtype} {tuple(scales.shape)} does not fit qweight "
                          f"{tuple(qweight.shape)} (expected [G, {n}])")
    groups = scales.shape[0]
    if group_size != -1 and (group_size <= 0 or k % group_size):
        raise MarlinError(f"{name}: K = {k} is not a multiple of the group size {group_size}; not supported")
    expect_groups = 1 if group_size == -1 else k // group_size
    if groups != expect_groups:
        raise MarlinError(f"{name}: scales has {groups} groups, expected {expect_groups} for K = {k} and "
                          f"group size {group_size}")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, n // 8) or n % 8:
        raise MarlinError(f"{name}: qzeros {qzeros.dtype} {tuple(qzeros.shape)} does not fit [{groups}, {n // 8}] "
                          "int32")
    zeros = unpack_int4(qzeros)
    want = ZERO_NIBBLE[zero_format]
    if not bool((zeros == want).all()):
        seen = sorted({int(v) for v in zeros.unique()[:5].tolist()})
        other = "v2" if zero_format == "v1" else "v1"
        hint = (f"; every nibble is {ZERO_NIBBLE[other]}: the checkpoint looks like {CHECKPOINT_FORMAT[other]}, "
                "check checkpoint_format" if seen == [ZERO_NIBBLE[other]] else " (asymmetric zero points)")
        raise MarlinError(f"{name}: qzeros nibbles are {seen}, expected {want} for symmetric "
                          f"{CHECKPOINT_FORMAT[zero_format]}{hint}")
    codes = unpack_int4(qweight.t().contiguous())
    perm = None
    if "g_idx" in tensors:
        perm = act_order_perm(tensors["g_idx"], k, groups, name, "g_idx")
        if perm is not None:
            codes = codes[:, perm]
    return codes, scales.t().contiguous(), perm


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def build_config(
    group_size: int,
    desc_act: bool = False,
    zero_format: ZeroFormat = "v1",
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    static_groups: bool = False,
) -> dict[str, Any]:
    """The ``quantization_config`` of config.json (also quantize_config.json) for a symmetric 4-bit GPTQ export.

    AutoGPTQ's ``BaseQuantizeConfig.to_dict`` fields, in its order, plus ``lm_head: false`` (GPTQModel; read
    by vLLM and SGLang). ``checkpoint_format`` is ``gptq`` (v1 zeros) or ``gptq_v2``; GPTQModel also reads
    it (as the deprecated alias of ``format``), vLLM ignores it (it ignores qzeros for symmetric layers).
    """
    _check_zero_format(zero_format)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group size must be positive or -1, got {group_size}")
    return {
        "bits": 4,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "sym": True,
        "true_sequential": true_sequential,
        "model_name_or_path": None,
        "model_file_base_name": None,
        "quant_method": "gptq",
        "checkpoint_format": CHECKPOINT_FORMAT[zero_format],
        "lm_head": False,
    }


_KNOWN_FORMATS = {"gptq": "v1", "gptq_v2": "v2"}


def parse_config(qc: dict[str, Any], where: str) -> GPTQScheme:
    """Read a GPTQ ``quantization_config`` (AutoGPTQ or GPTQModel); refuse what we cannot serve exactly.

    Args:
        qc: the ``quantization_config`` entry of config.json, or quantize_config.json.
        where: the file it came from, named in errors.

    Raises:
        MarlinError: one line naming ``where`` and the field: quant_method not gptq, bits != 4, sym false,
        a format other than gptq/gptq_v2 (marlin, bitblas, gptq_p, ...), a quantized lm_head, per-module
        ``dynamic`` overrides, a bad group_size.
    """
    base = f"{where}: quantization_config"
    method = str(qc.get("quant_method", qc.get("method", "gptq"))).lower()
    if method != "gptq":
        raise MarlinError(f"{base}.quant_method is {method!r}, expected 'gptq'")
    if qc.get("is_marlin_format"):
        raise MarlinError(f"{base}.is_marlin_format is true (AutoGPTQ's Marlin layout); only gptq/gptq_v2")
    fmt_key = "format" if "format" in qc else "checkpoint_format"
    fmt = str(qc.get(fmt_key, "gptq")).lower()
    if fmt not in _KNOWN_FORMATS:
        raise MarlinError(f"{base}.{fmt_key} is {fmt!r}; only 'gptq' and 'gptq_v2' are supported")
    other = qc.get("checkpoint_format")
    if fmt_key == "format" and other is not None and str(other).lower() != fmt:
        raise MarlinError(f"{base}.checkpoint_format {other!r} contradicts format {fmt!r}")
    bits = qc.get("bits")
    if bits != 4:
        raise MarlinError(f"{base}.bits is {bits!r}; only 4-bit is supported")
    sym = qc.get("sym", True)
    if sym is not True:
        raise MarlinError(f"{base}.sym is {sym!r} (asymmetric zero points); only symmetric int4 is supported")
    gs = qc.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs != -1 and gs <= 0):
        raise MarlinError(f"{base}.group_size is {gs!r}; expected a positive integer or -1")
    desc_act = qc.get("desc_act", False)
    if not isinstance(desc_act, bool):
        raise MarlinError(f"{base}.desc_act is {desc_act!r}; expected true or false")
    if qc.get("lm_head", False):
        raise MarlinError(f"{base}.lm_head is true (quantized lm_head); not supported")
    if qc.get("dynamic"):
        raise MarlinError(f"{base}.dynamic has per-module overrides; not supported")
    return GPTQScheme(bits=4, group_size=gs, desc_act=desc_act and gs != -1, sym=True,
                      zero_format=_KNOWN_FORMATS[fmt])  # type: ignore[arg-type]


def which_layers_fail(shapes: dict[str, tuple[int, int]], group_size: int) -> list[str]:
    """Layers that cannot be written as GPTQ with this group size, one line each.

    Args:
        shapes: layer name -> (K, N) = (in_features, out_features).
        group_size: g > 0 or -1.

    Returns:
        Problems (K not a multiple of 8 or of g, N not a multiple of 8 for ``qzeros``); empty if none.
    """
    problems = []
    for name, (k, n) in shapes.items():
        if k % 8:
            problems.append(f"{name}: K = {k} is not a multiple of 8 (qweight packs 8 rows per int32)")
        elif group_size != -1 and k % group_size:
            problems.append(f"{name}: K = {k} is not a multiple of the group size {group_size}")
        if n % 8:
            problems.append(f"{name}: N = {n} is not a multiple of 8 (qzeros packs 8 columns per int32)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# The format interface (marlin_cli.formats)
# ---------------------------------------------------------------------------------------------------------

NAME = "gptq"
LAYER_TENSORS = ("qweight", "scales", "qzeros", "g_idx")


def check(shapes: Sequence[LinearShape], group_size: int) -> list[str]:
    """Linears GPTQ cannot hold at this group size (K not a multiple of 8 or g, N not of 8), and what to do."""
    from marlin_cli.formats.compressed_tensors import fix_hint

    problems = which_layers_fail({s.name: (s.in_features, s.out_features) for s in shapes}, group_size)
    return summarize(problems, fix_hint(shapes, which_layers_fail, NAME)) if problems else []


def encode(linear: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``<name>.qweight`` / ``.scales`` (fp16) / ``.qzeros`` (v1: 0x77777777) / ``.g_idx`` for one linear."""
    tensors = encode_tensors(linear.codes, linear.scales, linear.group_size, zero_format="v1", dtype=torch.float16)
    return {f"{linear.name}.{key}": value for key, value in tensors.items()}


def quantization_config(settings: QuantSettings, modules: Sequence[str]) -> dict[str, Any]:
    """AutoGPTQ's config with ``checkpoint_format: gptq`` (v1 zeros), no act-order, ``lm_head: false``.

    Every decoder linear is quantized (``--skip-gq`` is refused for this format by the settings: GPTQ clients
    quantize every linear of a block unless per-module ``dynamic`` rules say otherwise)."""
    return build_config(settings.group_size, desc_act=False, zero_format="v1", damp_percent=settings.damp,
                        true_sequential=settings.true_sequential)


def recognizes(qc: dict) -> bool:
    """True for a GPTQ ``quantization_config`` (AutoGPTQ / GPTQModel / transformers' GPTQConfig)."""
    return str(qc.get("quant_method", "")).lower() == "gptq"


def read(source: TensorSource, qc: dict) -> Iterator[CodesLinear]:
    """Codes and scales of every GPTQ linear (zeros checked against v1/v2; act-order sorted, with its permutation)."""
    from marlin_cli.formats.base import read_codes  # one read loop for the codes + scales formats

    return read_codes(source, qc, label="GPTQ", marker="qweight", layer_tensors=LAYER_TENSORS,
                      parse_config=parse_config,
                      decode=lambda tensors, layer, scheme: decode_tensors(tensors, scheme.group_size,
                                                                           scheme.zero_format, scheme.sym, layer))
