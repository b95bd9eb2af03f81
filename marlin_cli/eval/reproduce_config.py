"""The declarative config of ``marlin reproduce`` (configs/reproduce_*.json), read into typed records.

Keys that start with ``_`` carry the reason for their sibling field and are ignored by the reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from marlin_cli.errors import MarlinError
from marlin_cli.settings import FIELDS, QuantSettings

VARIANTS = ("fp16", "rtn", "gptq")
"""Columns of the table: the unquantized model, round-to-nearest int4, GPTQ int4 (same group size)."""


@dataclass(frozen=True)
class ModelSpec:
    """One row: a model (alias, folder or hub id) and the original's reported numbers for it.

    ``reference[dataset][variant]`` is a perplexity from the original (variant in :data:`VARIANTS`).
    """

    name: str
    path: str
    reference: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation dataset; its protocol follows from the dataset (stream or documents)."""

    name: str
    seqlen: int
    max_windows: int | None = None
    max_docs: int | None = None


CALIBRATION_KEYS = ("dataset", "nsamples", "seqlen", "seed", "holdout")
"""Settings the config's ``calibration`` section holds (the first three are required)."""
QUANTIZATION_KEYS = tuple(k for k in FIELDS if k not in (*CALIBRATION_KEYS, "device", "nearest"))
"""Settings the config's ``quantization`` section may hold (``group_size`` is required). The device comes from
the command line; ``nearest`` is the RTN column's own."""


@dataclass(frozen=True)
class Checks:
    """Pass/fail rules. ``max_ppl_ratio``: the largest allowed GPTQ ppl / fp16 ppl on every dataset."""

    gptq_beats_rtn: bool
    max_ppl_ratio: float


@dataclass(frozen=True)
class ReproduceConfig:
    """A whole reproduction: rows (models), datasets, quantizer settings (calibration included) and checks.

    ``settings`` is the config's ``calibration`` and ``quantization`` sections read into one
    :class:`QuantSettings`; the RTN and GPTQ columns are made from it (RTN with ``nearest=True``).
    """

    name: str
    description: str
    models: tuple[ModelSpec, ...]
    datasets: tuple[DatasetSpec, ...]
    settings: QuantSettings
    checks: Checks
    dtype: str = "auto"
    reference_source: str = ""
    source_path: str = ""


def _fields(raw: dict[str, Any], what: str, cls: type) -> dict[str, Any]:
    """``raw`` without ``_reason`` keys, checked against the fields of the dataclass ``cls``."""
    clean = {k: v for k, v in raw.items() if not k.startswith("_")}
    known = set(cls.__dataclass_fields__)
    unknown = set(clean) - known
    if unknown:
        raise MarlinError(
            f"reproduce config: unknown key(s) {sorted(unknown)} in {what}; known: {sorted(known)}"
        )
    return clean


def _build(cls: type, raw: Any, what: str) -> Any:
    """Construct ``cls`` from the JSON object ``raw``, turning missing fields into a MarlinError."""
    if not isinstance(raw, dict):
        raise MarlinError(f"reproduce config: {what} must be a JSON object")
    try:
        return cls(**_fields(raw, what, cls))
    except TypeError as err:
        raise MarlinError(f"reproduce config: {what}: {err}") from err


def _config_text(name_or_path: str) -> tuple[str, str]:
    """The JSON text and where it came from: a file path, or a name ``X`` for configs/reproduce_X.json."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise MarlinError(f"reproduce config {path} does not exist")
        return path.read_text(), str(path)
    file = f"reproduce_{name_or_path}.json"
    try:
        return resources.files("marlin_configs").joinpath(file).read_text(), f"configs/{file}"
    except (ModuleNotFoundError, FileNotFoundError):
        local = Path(__file__).resolve().parents[2] / "configs" / file
        if local.is_file():
            return local.read_text(), f"configs/{file}"
    raise MarlinError(
        f"no reproduce config named '{name_or_path}' (configs/{file}); give a name or a .json path"
    )


def load_config(name_or_path: str) -> ReproduceConfig:
    """Read and check a reproduce config: a name (``builtin``, ``llama2``) or a path to a JSON file."""
    text, source = _config_text(name_or_path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise MarlinError(f"reproduce config {source} is not valid JSON: {err}") from err
    top = _fields(raw, "the top level", _Top)
    missing = {"name", "models", "datasets", "calibration", "quantization", "checks"} - set(top)
    if missing:
        raise MarlinError(f"reproduce config {source} lacks {sorted(missing)}")
    models = tuple(_build(ModelSpec, m, f"models[{i}]") for i, m in enumerate(top["models"]))
    datasets = tuple(_build(DatasetSpec, d, f"datasets[{i}]") for i, d in enumerate(top["datasets"]))
    if not models or not datasets:
        raise MarlinError(f"reproduce config {source} needs at least one model and one dataset")
    for m in models:
        for ds, row in m.reference.items():
            bad = set(row) - set(VARIANTS)
            if bad:
                raise MarlinError(
                    f"reproduce config: reference of {m.name}/{ds} has unknown variant(s) {sorted(bad)}"
                )
    return ReproduceConfig(
        name=top["name"],
        description=top.get("description", ""),
        models=models,
        datasets=datasets,
        settings=_settings(top["calibration"], top["quantization"], source),
        checks=_build(Checks, top["checks"], "checks"),
        dtype=top.get("dtype", "auto"),
        reference_source=top.get("reference_source", ""),
        source_path=source,
    )


def _section(raw: Any, what: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """One settings section without ``_reason`` keys, its keys checked against ``allowed`` and ``required``."""
    if not isinstance(raw, dict):
        raise MarlinError(f"reproduce config: {what} must be a JSON object")
    clean = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = set(clean) - set(allowed)
    if unknown:
        raise MarlinError(f"reproduce config: unknown key(s) {sorted(unknown)} in {what}; known: {sorted(allowed)}")
    missing = [k for k in required if k not in clean]
    if missing:
        raise MarlinError(f"reproduce config: {what} lacks {missing}")
    return clean


def _settings(calibration: Any, quantization: Any, source: str) -> QuantSettings:
    """The ``calibration`` and ``quantization`` sections loaded into one :class:`QuantSettings`."""
    cal = _section(calibration, "calibration", CALIBRATION_KEYS, CALIBRATION_KEYS[:3])
    quant = _section(quantization, "quantization", QUANTIZATION_KEYS, ("group_size",))
    try:
        return QuantSettings.from_dict({**cal, **quant}, f"reproduce config {source}")
    except TypeError as err:
        raise MarlinError(f"reproduce config {source}: {err}") from err


@dataclass(frozen=True)
class _Top:
    """The keys allowed at the top level of a config file (used only to check them)."""

    name: str
    description: str
    models: list
    datasets: list
    calibration: dict
    quantization: dict
    checks: dict
    dtype: str
    reference_source: str
