"""The settings of a quantization run, in one typed object: defaults and validation live here, once.

``marlin quantize`` builds a :class:`QuantSettings` from its options, ``marlin reproduce`` loads its config's
``calibration`` and ``quantization`` sections into one, the checkpoint's ``quantization_config`` and its run
record serialize it (:meth:`QuantSettings.to_dict`), and the solver gets the part it needs
(:meth:`QuantSettings.gptq_config`). Model-dependent defaults (the built-in model calibrates on less data than
a 7B model) are filled in by :meth:`QuantSettings.resolved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptq import format as fmt
from gptq.quantizer import DEFAULT_SEARCH
from gptq.solver import DEFAULT_DAMP, GPTQConfig
from marlin_cli.errors import MarlinError
from marlin_cli.formats import FORMATS
from marlin_cli.pipeline.models import BUILTIN_ALIASES
from marlin_cli.runtime import resolve_device

DEFAULT_GROUP_SIZE = 128
"""Input features per scale unless asked otherwise (the Marlin paper's and vLLM's default for 4-bit)."""

METHODS = {
    "fast": "signed scales searched against each input feature's mean squared activation, round to nearest: one "
            "pass over the calibration data per layer, on the unquantized model's activations",
    "best": "fast, then 12 signed-gradient steps per decoder layer (SignRound) on its rounding and scales against "
            "the unquantized layer's outputs, on the quantized model's activations",
    "gptq": "the original's GPTQ: unsigned scales with group grid clipping (Frantar et al., 2022; IST-DASLab's Marlin)",
    "rtn": "round to nearest on the covering unsigned scale; reads no calibration data",
}
"""The quantization methods, by name (``--method``), with what each does. ``fast`` is the default."""

CALIBRATION_DEFAULTS = {
    "builtin": ("pydocs", 64, 512),
    "other": ("redpajama", 256, 4096),
}
"""(dataset, nsamples, seqlen) when not given: the built-in model calibrates on 64 Python-doc documents of at
most 512 tokens; other models on 256 RedPajama documents of at most 4096 tokens (the original's setting)."""


@dataclass(frozen=True)
class QuantSettings:
    """How to quantize a model. Every field has its one default and its one check here.

    Attributes:
        bits: bits per weight; 4 is the only width the Marlin kernel reads.
        group_size: input features per scale, one of ``gptq.format.GROUP_SIZES`` (-1: per output channel).
        symmetric: symmetric grid ``W = (q - 8) * s``; the only grid the kernel reads.
        damp: Hessian damping as a fraction of mean(diag H) (GPTQ's and Marlin's 0.1).
        clip: group grid clipping: each group's scale is shrunk by the factor p (of :attr:`clip_factors`)
            that minimises the Hessian-weighted error (``gptq``); for ``fast`` and ``best``, False keeps the
            signed search to the covering scales (no shrink factors below 1).
        clip_grid, clip_max_shrink: the clipping grid p = 1.00, 0.99, ... (``clip_grid`` steps per unit,
            down to ``1 - clip_max_shrink + 1 / clip_grid`` = 0.26).
        act_order: quantize columns in order of decreasing Hessian diagonal; reserved (must be False: the
            kernel here has no input-feature permutation).
        dataset, nsamples, seqlen: calibration data; ``None``: the model's default (see :meth:`resolved`).
        seed: seed for shuffling documents and placing windows.
        holdout: documents of a local calibration file to hold out first (as a named corpus holds out its
            evaluation documents); ``None`` or 0: the file is used whole. Named corpora always hold out theirs.
        format: checkpoint format, a name in :data:`marlin_cli.formats.FORMATS`: ``compressed-tensors``
            (default; what vLLM and SGLang serve), ``gptq`` or ``marlin`` (this tool's kernel layout).
        device: where the layers run (``cpu``, ``cuda``, ``cuda:N``).
        true_sequential: quantize q/k/v, then o, then gate/up, then down, each on the quantized ones' outputs.
        skip_gq: keep k_proj/v_proj in fp16 for grouped-query-attention models.
        method: one of :data:`METHODS`: ``fast`` (default), ``best``, ``gptq`` (the original's algorithm) or
            ``rtn``.
        nearest: shorthand for ``method="rtn"`` (``--nearest``); kept equal to ``method == "rtn"``.
        activation_budget_gb: GiB of calibration activations kept on the GPU; the rest live in pinned host
            memory and stream to the GPU batch by batch (same codes, see docs/scale.md). ``None``: half of
            the GPU memory free once the model's stem is loaded. No effect on the CPU, where everything
            already is in host memory.
    """

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = True
    damp: float = DEFAULT_DAMP
    clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.75
    act_order: bool = False
    dataset: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    holdout: int | None = None
    format: str = "compressed-tensors"
    device: str = "cpu"
    true_sequential: bool = False
    skip_gq: bool = False
    method: str = "fast"
    nearest: bool = False
    activation_budget_gb: float | None = None

    def __post_init__(self) -> None:
        if self.nearest and self.method in ("fast", "rtn"):  # --nearest is --method rtn
            object.__setattr__(self, "method", "rtn")
        elif self.method == "rtn":
            object.__setattr__(self, "nearest", True)
        problems = self.problems()
        if problems:
            raise MarlinError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid value, one sentence each naming the command-line option (empty when all is well)."""
        out = []
        if self.method not in METHODS:
            out.append(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        elif self.nearest and self.method != "rtn":
            out.append(f"--nearest is --method rtn; it cannot be combined with --method {self.method}")
        if self.true_sequential and self.method == "fast":
            out.append("--true-sequential needs the quantized model's activations, which --method fast does not "
                       "use; pick --method best or gptq, or drop --true-sequential")
        if self.bits != 4:
            out.append(f"--bits {self.bits}: the Marlin kernel reads 4-bit weights only")
        try:
            fmt.check_group_size(self.group_size)
        except ValueError as err:
            out.append(f"--group-size: {err}")
        if not self.symmetric:
            out.append("asymmetric quantization is not supported: the Marlin kernel reads W = (q - 8) * s")
        if not 0 < self.damp < 10:
            out.append(f"--damp must lie in (0, 10) as a fraction of mean(diag H), got {self.damp}")
        if self.clip_grid < 1 or not 0 < self.clip_max_shrink < 1:
            out.append(f"clip grid: need clip_grid >= 1 and 0 < clip_max_shrink < 1, got {self.clip_grid}, "
                       f"{self.clip_max_shrink}")
        if self.act_order:
            out.append("act_order is reserved: the kernel here has no input-feature permutation")
        if self.nsamples is not None and self.nsamples < 1:
            out.append(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            out.append(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.holdout is not None and self.holdout < 0:
            out.append(f"--holdout must be 0 or more, got {self.holdout}")
        if self.format not in FORMATS:
            out.append(f"--format {self.format!r} is not supported; use one of {', '.join(FORMATS)}")
        elif self.skip_gq and self.format != "marlin":
            out.append(f"--skip-gq keeps k_proj/v_proj dense while q_proj is quantized, but vLLM and SGLang fuse "
                       f"q/k/v into one layer that is all quantized or all dense, so a {self.format} checkpoint "
                       "cannot hold it; drop --skip-gq, or use --format marlin")
        if self.activation_budget_gb is not None and not self.activation_budget_gb >= 0:
            out.append(f"--activation-budget must be 0 or more GiB, got {self.activation_budget_gb}")
        if not self.device.startswith(("cpu", "cuda")):
            out.append(f"--device must be cpu or cuda[:N]; got '{self.device}'")
        return out

    @property
    def clip_factors(self) -> tuple[float, ...]:
        """The shrink factors p the clipping search tries: 1.00, 0.99, ..., 0.26 by default."""
        steps = int(self.clip_max_shrink * self.clip_grid)
        return tuple(round(1.0 - i / self.clip_grid, 6) for i in range(steps))

    def resolved(self, model: str) -> QuantSettings:
        """A copy with the model-dependent calibration defaults filled in and the device checked.

        Round to nearest keeps no clipping (it has no Hessian to weigh the error with).
        """
        dataset, nsamples, seqlen = CALIBRATION_DEFAULTS["builtin" if model in BUILTIN_ALIASES else "other"]
        resolve_device(self.device)  # a CUDA device that is not there is an error before any work
        return dataclasses.replace(
            self,
            dataset=self.dataset or dataset,
            nsamples=nsamples if self.nsamples is None else self.nsamples,
            seqlen=seqlen if self.seqlen is None else self.seqlen,
            clip=self.clip and not self.nearest,
        )

    def gptq_config(self) -> GPTQConfig:
        """The solver's own input: the part of these settings that quantizing one matrix needs."""
        signed = self.method in ("fast", "best")
        return GPTQConfig(group_size=self.group_size, damp=self.damp, clip=self.clip, clip_grid=self.clip_grid,
                          clip_max_shrink=self.clip_max_shrink, signed=signed,
                          search=DEFAULT_SEARCH if self.clip else (1.0, 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what the checkpoint's run record and ``quantization_config`` keep)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], what: str = "settings") -> QuantSettings:
        """Settings from a JSON object (keys starting with ``_`` are comments); unknown keys are an error."""
        clean = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = set(clean) - set(FIELDS)
        if unknown:
            raise MarlinError(f"{what}: unknown key(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
        return cls(**clean)


FIELDS = tuple(f.name for f in dataclasses.fields(QuantSettings))
DEFAULTS = QuantSettings()
"""The defaults, for the command line's option defaults (``DEFAULTS.group_size``, ``DEFAULTS.damp``...)."""
