"""Checkpoint tensors in a chosen format: the last step of ``marlin quantize`` and ``marlin pack``
(:func:`write_tensors`), and ``marlin export`` (:func:`export_checkpoint`), which converts a quantized
checkpoint of any format this tool reads into any format it writes, code for code and scale for scale."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from transformers import AutoConfig, AutoTokenizer

from gptq import format as fmt
from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS, CodesLinear, LinearShape, PackedLinear, QuantizedLinear
from marlin_cli.formats.base import vllm_marlin_warning
from marlin_cli.formats.folder import RUN_RECORD, CheckpointWriter, check_output_dir
from marlin_cli.pipeline.weights import WeightStore

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Linears that vLLM and SGLang fuse into one layer: in a compressed-tensors or GPTQ checkpoint they must be
all quantized or all dense."""

SERVED = ("compressed-tensors", "gptq")
"""Formats that serving engines load (the Marlin format is this tool's own)."""


def warn(message: str) -> None:
    """One line on stderr (the CLI's stdout stays the result)."""
    print(message, file=sys.stderr, flush=True)


def serving_warning(codec: ModuleType, shapes: list[LinearShape]) -> str | None:
    """The vLLM Marlin shape warning for a served format (None for ``marlin`` or when every shape fits)."""
    return vllm_marlin_warning(shapes, codec.NAME) if codec.NAME in SERVED else None


def write_tensors(writer: CheckpointWriter, store: WeightStore, matrices: dict, group_size: int,
                  codec: ModuleType) -> None:
    """Copy every source tensor into ``writer``: quantized linears as ``codec`` encodes them, the rest as fp16.

    Args:
        matrices: full linear name -> object with ``codes`` uint8 [N, K] (0..15) and ``scales`` [N, G].
        codec: a format module of :data:`marlin_cli.formats.FORMATS` (its ``encode``).
    """
    shapes = [LinearShape(name, qm.codes.shape[1], qm.codes.shape[0]) for name, qm in matrices.items()]
    note = serving_warning(codec, shapes)
    if note:
        warn(note)
    for name in store.names():
        module, _, leaf = name.rpartition(".")
        if module in matrices and leaf == "weight":
            qm = matrices[module]
            for key, tensor in codec.encode(QuantizedLinear(module, qm.codes, qm.scales, group_size)).items():
                writer.add(key, tensor)
            continue
        tensor = store.get(name)
        writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)


def check_fused(quantized: set[str], dense: set[str], fmt_name: str) -> None:
    """Refuse a served format where some of a fused group (q/k/v, gate/up) is quantized and some dense."""
    for name in sorted(quantized):
        parent, _, leaf = name.rpartition(".")
        for group in FUSED:
            if leaf in group:
                mixed = [f"{parent}.{o}" for o in group if f"{parent}.{o}" in dense]
                if mixed:
                    raise MarlinError(f"{name} is quantized but {', '.join(mixed)} is dense; vLLM and SGLang fuse "
                                      f"{'/'.join(group)} into one layer that is all quantized or all dense, so "
                                      f"the {fmt_name} format cannot hold this checkpoint (it was made with "
                                      "--skip-gq?); keep it in --format marlin")


@dataclass
class _Codes:
    """One linear as codes uint8 [N, K] and scales [N, G] (what ``write_tensors`` takes)."""

    codes: torch.Tensor
    scales: torch.Tensor


def _as_codes(item: PackedLinear | CodesLinear) -> tuple[_Codes, int]:
    if isinstance(item, PackedLinear):
        shape = fmt.padded_shape(item.in_features, item.out_features, item.group_size)
        codes, scales = fmt.unpack(item.qweight, item.scales, shape)  # [K, N], [G, N]
        return _Codes(codes.T.contiguous().to(torch.uint8), scales.T.contiguous()), item.group_size
    if item.perm is not None:
        raise MarlinError(f"{item.name}: act-order layer (its input features are reordered into groups); "
                          "`marlin export` writes layers in their natural order only, so it cannot convert it")
    return _Codes(item.codes.to(torch.uint8), item.scales), item.group_size


def _source_settings(model_dir: Path, qc: dict, group_size: int, target: str):  # noqa: ANN202 - QuantSettings
    """The settings of the run that made the source (from its run record), with the target format."""
    from marlin_cli.settings import FIELDS, QuantSettings

    record_path = model_dir / RUN_RECORD
    raw: dict = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            raw = {k: record[k] for k in FIELDS if k in record}
        except (OSError, ValueError):
            raw = {}
    raw.update(group_size=group_size, format=target, skip_gq=False, act_order=False)
    try:
        return QuantSettings.from_dict(raw)
    except (MarlinError, TypeError):
        return QuantSettings(group_size=group_size, format=target)


def export_checkpoint(checkpoint: str, target: str, out: Path, force: bool = False) -> tuple[Path, int, str]:
    """Convert a quantized checkpoint (any format of :data:`FORMATS`) into ``target``; codes and scales unchanged.

    Returns (folder written, linears converted, source format name). Everything is checked before the output
    folder is created: the target's shape rules, fused groups, act-order. Scales are written as fp16.
    """
    from marlin_cli.loading import checkpoint_format, read_quantization_config
    from marlin_cli.pipeline.models import resolve_model_dir

    if target not in FORMATS:
        raise MarlinError(f"--format {target!r} is not supported; use one of {', '.join(FORMATS)}")
    codec = FORMATS[target]
    out = Path(out)
    check_output_dir(out, force)
    start = time.perf_counter()
    model_dir = resolve_model_dir(checkpoint)
    qc = read_quantization_config(model_dir)
    if qc is None:
        raise MarlinError(f"{checkpoint} is not quantized (no quantization_config in config.json); "
                          "use `marlin quantize` to quantize it")
    source = checkpoint_format(model_dir, qc)
    store = WeightStore(model_dir)
    matrices: dict[str, _Codes] = {}
    sizes = set()
    for item in source.read(store, qc):
        matrices[item.name], g = _as_codes(item)
        sizes.add(g)
    if len(sizes) != 1:
        raise MarlinError(f"{checkpoint}: its linears use group sizes {sorted(sizes)}; one is needed")
    group_size = sizes.pop()
    shapes = [LinearShape(n, m.codes.shape[1], m.codes.shape[0]) for n, m in matrices.items()]
    problems = codec.check(shapes, group_size)
    if problems:
        raise MarlinError(f"the {codec.NAME} format cannot hold {checkpoint}: " + "; ".join(problems))
    dense = {name.rpartition(".")[0] for name in store.names() if name.endswith(".weight")}
    if codec.NAME in SERVED:
        check_fused(set(matrices), dense, codec.NAME)
    settings = _source_settings(model_dir, qc, group_size, target)
    config = AutoConfig.from_pretrained(model_dir).to_dict()
    config["torch_dtype"] = "float16"
    config["quantization_config"] = codec.quantization_config(settings, list(matrices))
    record: dict = {"exported_from": str(checkpoint), "source_format": source.NAME, "format": codec.NAME,
                    "group_size": group_size, "linears": len(matrices), "method": "export"}
    if (model_dir / RUN_RECORD).is_file():
        with contextlib.suppress(OSError, ValueError):
            record["source_record"] = json.loads((model_dir / RUN_RECORD).read_text())
    own = {f"{name}.{leaf}" for name in matrices for leaf in _leaves(store, name)}
    with CheckpointWriter(out, force=force) as writer:
        write_tensors(writer, _Without(store, own, matrices), matrices, group_size, codec)
        record["seconds"] = round(time.perf_counter() - start, 2)
        out_dir = writer.finish(config, AutoTokenizer.from_pretrained(model_dir), record, source_dir=model_dir)
    return out_dir, len(matrices), source.NAME


def _leaves(store: WeightStore, module: str) -> list[str]:
    """The tensors stored under ``module.`` except its bias (the quantized linear's own, in any format)."""
    prefix = module + "."
    return [n[len(prefix):] for n in store.names() if n.startswith(prefix) and "." not in n[len(prefix):]
            and n[len(prefix):] != "bias"]


class _Without:
    """A :class:`WeightStore` view for :func:`write_tensors`: each quantized linear's own tensors become one
    ``<name>.weight`` entry (which write_tensors replaces by the target's encoding); the rest pass through."""

    def __init__(self, store: WeightStore, own: set[str], matrices: dict) -> None:
        self.store, self.own, self.matrices = store, own, matrices

    def names(self) -> list[str]:
        out, seen = [], set()
        for name in self.store.names():
            if name in self.own:
                module = name.rpartition(".")[0]
                if module not in seen:
                    seen.add(module)
                    out.append(f"{module}.weight")
            else:
                out.append(name)
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.store.get(name)
