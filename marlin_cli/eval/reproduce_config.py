"""The declarative config of ``marlin reproduce`` (configs/reproduce_*.json), read into typed records.

Keys that start with ``_`` carry the reason for their sibling field and are ignored by the reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from marlin_cli.errors import MarlinError
from marlin_cli.settings import DEFAULTS, FIELDS, METHODS, QuantSettings

FP16 = "fp16"
"""The first column of every table: the unquantized model, evaluated in the config's ``dtype``."""
DEFAULT_METHOD = DEFAULTS.method
"""The method ``marlin quantize`` uses unless told otherwise (``fast``); ``default_beats_gptq`` checks it."""
BASE_METHOD = "gptq"
"""The method of :attr:`ReproduceConfig.settings` itself (the original's, which takes every other setting); no
column uses it as it is: each replaces it by its own (:meth:`ReproduceConfig.method_settings`)."""


@dataclass(frozen=True)
class ModelSpec:
    """One row: a model (alias, folder or hub id) and the original's reported numbers for it.

    ``reference[dataset][column]`` is a perplexity from the original (column: ``fp16`` or one of the config's
    methods; a method without a reference, such as ``fast``, simply has none).
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
QUANTIZATION_KEYS = tuple(k for k in FIELDS if k not in (*CALIBRATION_KEYS, "device", "method", "nearest"))
"""Settings the config's ``quantization`` section may hold (``group_size`` is required). The device comes from
the command line; ``method`` (and its shorthand ``nearest``) is each column's own, from the config's
``methods``."""


@dataclass(frozen=True)
class Checks:
    """Pass/fail rules, each on every (model, dataset).

    Attributes:
        gptq_beats_rtn: GPTQ's perplexity is below RTN's (needs both columns).
        default_beats_gptq: the default method's (:data:`DEFAULT_METHOD`) perplexity is below GPTQ's (needs
            both columns).
        max_ppl_ratio: per method, the largest allowed method ppl / fp16 ppl (methods not named: no bound).
    """

    gptq_beats_rtn: bool
    default_beats_gptq: bool
    max_ppl_ratio: dict[str, float]


@dataclass(frozen=True)
class ReproduceConfig:
    """A whole reproduction: rows (models), datasets, methods (columns), quantizer settings and checks.

    ``settings`` is the config's ``calibration`` and ``quantization`` sections read into one
    :class:`QuantSettings` (method :data:`BASE_METHOD`); each method's column quantizes with ``settings`` and
    that method (:meth:`method_settings`).
    """

    name: str
    description: str
    models: tuple[ModelSpec, ...]
    datasets: tuple[DatasetSpec, ...]
    settings: QuantSettings
    checks: Checks
    methods: tuple[str, ...] = ("rtn", "gptq", DEFAULT_METHOD)
    dtype: str = "auto"
    reference_source: str = ""
    source_path: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        """The table's columns: ``fp16``, then the config's methods in their order."""
        return (FP16, *self.methods)

    def method_settings(self, method: str, device: str) -> QuantSettings:
        """The settings of ``method``'s column: the config's, with that method, on ``device``."""
        return replace(self.settings, method=method, device=device)


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
    missing = {"name", "models", "datasets", "methods", "calibration", "quantization", "checks"} - set(top)
    if missing:
        raise MarlinError(f"reproduce config {source} lacks {sorted(missing)}")
    models = tuple(_build(ModelSpec, m, f"models[{i}]") for i, m in enumerate(top["models"]))
    datasets = tuple(_build(DatasetSpec, d, f"datasets[{i}]") for i, d in enumerate(top["datasets"]))
    if not models or not datasets:
        raise MarlinError(f"reproduce config {source} needs at least one model and one dataset")
    methods = _methods(top["methods"])
    columns = (FP16, *methods)
    for m in models:
        for ds, row in m.reference.items():
            bad = set(row) - set(columns)
            if bad:
                raise MarlinError(
                    f"reproduce config: reference of {m.name}/{ds} has unknown variant(s) {sorted(bad)}; "
                    f"the table's columns are {list(columns)}"
                )
    settings = _settings(top["calibration"], top["quantization"], source)
    for method in methods:  # a method the settings cannot run with is an error now, not after hours of work
        try:
            replace(settings, method=method)
        except MarlinError as err:
            raise MarlinError(f"reproduce config {source}: the {method} column: {err}") from err
    return ReproduceConfig(
        name=top["name"],
        description=top.get("description", ""),
        models=models,
        datasets=datasets,
        settings=settings,
        checks=_checks(top["checks"], methods),
        methods=methods,
        dtype=top.get("dtype", "auto"),
        reference_source=top.get("reference_source", ""),
        source_path=source,
    )


def _methods(raw: Any) -> tuple[str, ...]:
    """The config's ``methods``: a non-empty list of distinct names from :data:`marlin_cli.settings.METHODS`."""
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
        raise MarlinError(f"reproduce config: methods must be a non-empty list of method names from {list(METHODS)}")
    unknown = [m for m in raw if m not in METHODS]
    if unknown:
        raise MarlinError(f"reproduce config: unknown method(s) {unknown} in methods; known: {list(METHODS)} "
                          "(fp16 is always the first column and is not listed)")
    if len(set(raw)) != len(raw):
        raise MarlinError(f"reproduce config: methods {raw} name a method twice")
    return tuple(raw)


def _checks(raw: Any, methods: tuple[str, ...]) -> Checks:
    """The ``checks`` section, each check's columns required among ``methods``."""
    checks = _build(Checks, raw, "checks")
    need = {"gptq_beats_rtn": ("gptq", "rtn"), "default_beats_gptq": (DEFAULT_METHOD, "gptq")}
    for name, cols in need.items():
        absent = [c for c in cols if c not in methods]
        if getattr(checks, name) is True and absent:
            raise MarlinError(f"reproduce config: checks.{name} compares columns {list(cols)}, but methods "
                              f"{list(methods)} lack {absent}")
        if not isinstance(getattr(checks, name), bool):
            raise MarlinError(f"reproduce config: checks.{name} must be true or false")
    bounds = checks.max_ppl_ratio
    if not isinstance(bounds, dict):
        raise MarlinError('reproduce config: checks.max_ppl_ratio must map methods to their largest allowed '
                          'ppl / fp16 ppl, e.g. {"gptq": 1.35}')
    absent = [m for m in bounds if m not in methods]
    if absent:
        raise MarlinError(f"reproduce config: checks.max_ppl_ratio bounds {absent}, which are not columns of "
                          f"the table (methods {list(methods)})")
    for m, bound in bounds.items():
        if isinstance(bound, bool) or not isinstance(bound, int | float) or not bound > 0:
            raise MarlinError(f"reproduce config: checks.max_ppl_ratio.{m} must be a positive number, got {bound!r}")
    return replace(checks, max_ppl_ratio={m: float(b) for m, b in bounds.items()})


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
    """The ``calibration`` and ``quantization`` sections loaded into one :class:`QuantSettings`.

    Its method is :data:`BASE_METHOD`, which every other setting allows, so that a setting one column's method
    refuses (``true_sequential`` with ``fast``) is reported for that column (:func:`load_config`).
    """
    cal = _section(calibration, "calibration", CALIBRATION_KEYS, CALIBRATION_KEYS[:3])
    quant = _section(quantization, "quantization", QUANTIZATION_KEYS, ("group_size",))
    try:
        return QuantSettings.from_dict({**cal, **quant, "method": BASE_METHOD}, f"reproduce config {source}")
    except TypeError as err:
        raise MarlinError(f"reproduce config {source}: {err}") from err


@dataclass(frozen=True)
class _Top:
    """The keys allowed at the top level of a config file (used only to check them)."""

    name: str
    description: str
    models: list
    datasets: list
    methods: list
    calibration: dict
    quantization: dict
    checks: dict
    dtype: str
    reference_source: str
