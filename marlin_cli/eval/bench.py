"""Decode speed of a quantized model and of its fp16 original: tokens/s and ms per token, under CUDA graphs.

For each model variant (fp16 original, Marlin, Marlin with q/k/v and gate/up fused) and each batch size B
and context length L: a fresh static KV cache (transformers ``StaticCache``), a prefill of B random prompts of
L tokens, then one decode step (B sequences, one new token each: embedding, every layer with attention over
the cache, lm_head, greedy argmax fed back as the next input) captured in a CUDA graph and replayed
``steps`` times per round. The time of a round / steps is the latency per token (every sequence gets one
token per step); tokens/s = B / latency. The best of ``rounds`` rounds is reported. The context grows by
one token per replayed step (the cache and the positions advance inside the graph), so "context L" means
L to L + rounds * steps + a few warm-up steps.

What is compared: a checkpoint (``load_model``) against the fp16 model it was quantized from (its run
record's ``source_dir``/``source_model`` when present here, else ``--baseline``, else a random fp16 model of
the checkpoint's dimensions: decode time does not depend on the weights' values); or, with ``synthetic``, a
random fp16 Llama of real dimensions (:data:`PRESETS`) and its round-to-nearest quantization.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gptq import format as fmt
from gptq.linear import MarlinLinear
from gptq.quantizer import quantize_codes, row_scales
from marlin_cli.errors import MarlinError
from marlin_cli.fuse import fuse_model, is_fused
from marlin_cli.pipeline.models import arch_spec
from marlin_cli.report import render_table
from marlin_cli.runtime import device_description, versions

try:  # the colleague's synthetic-model builder names the real shapes; same numbers kept here as a fallback
    from marlin_cli.pipeline.synthetic import PRESETS as _SYNTHETIC_PRESETS
except ImportError:  # pragma: no cover - only when pipeline/synthetic.py is absent
    _SYNTHETIC_PRESETS = {
        "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                      "num_key_value_heads": 32},
        "llama2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                       "num_key_value_heads": 8},
    }

PRESETS: dict[str, dict[str, int]] = {
    name: {**dims, "num_hidden_layers": {"llama2-7b": 32, "llama2-70b": 80}.get(name, 2), "vocab_size": 32000}
    for name, dims in _SYNTHETIC_PRESETS.items()
}
"""Synthetic model shapes (Llama-2 7B / 70B with their real layer counts and 32000-token vocabulary)."""

VARIANTS = ("fp16", "marlin", "marlin-fused")
"""fp16 original; Marlin linears one by one; Marlin with q/k/v and gate/up fused (:mod:`marlin_cli.fuse`)."""


@dataclass
class BenchOptions:
    """What ``marlin bench`` measures.

    checkpoint: a quantized checkpoint (folder, or anything ``load_model`` reads), or None with ``synthetic``.
    synthetic: a :data:`PRESETS` name: random fp16 model + its RTN quantization (group ``group_size``).
    layers: decoder layers of the synthetic model (default: the preset's real count).
    baseline: the fp16 model to compare with (default: from the checkpoint's run record, else random).
    """

    checkpoint: str | None = None
    synthetic: str | None = None
    layers: int | None = None
    baseline: str | None = None
    batches: tuple[int, ...] = (1, 8, 32)
    contexts: tuple[int, ...] = (512, 2048)
    steps: int = 50
    rounds: int = 3
    variants: tuple[str, ...] = VARIANTS
    group_size: int = 128
    dtype: torch.dtype = torch.float16
    device: str = "cuda"
    graphs: bool = True
    seed: int = 0
    progress: Callable[[str], None] | None = None


@dataclass
class Measurement:
    """One (variant, batch, context) point."""

    variant: str
    batch: int
    context: int
    ms_per_token: float
    tokens_per_s: float
    graphs: bool
    note: str = ""


@dataclass
class BenchResult:
    """Every measurement plus what identifies the run."""

    model: dict
    device: str
    measurements: list[Measurement] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready record."""
        return {"model": self.model, "device": self.device, "versions": self.versions, "options": self.options,
                "measurements": [m.__dict__ for m in self.measurements]}


# ---------------------------------------------------------------------------------------------- models


def rtn_marlin(weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float16) -> MarlinLinear:
    """Round-to-nearest 4-bit quantization of an ``nn.Linear`` weight into a MarlinLinear on its device.

    Args:
        weight: [N, K] (out, in) float weights.
        group_size: 32, 64, 128 or -1.
        bias: optional [N].
    Returns:
        MarlinLinear(K, N) with scales in ``dtype``; codes from :func:`gptq.quantizer.row_scales` (symmetric,
        zero code 8) per group of ``group_size`` input features.
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    groups = math.ceil(k / g)
    w = torch.nn.functional.pad(weight.float(), (0, groups * g - k)).reshape(n, groups, g)
    scales = row_scales(w)  # [N, G, 1] float32 (fp16-representable)
    codes = quantize_codes(w, scales).reshape(n, groups * g)[:, :k].to(torch.int32)
    layer = MarlinLinear(k, n, group_size, bias=bias is not None, device=weight.device, dtype=dtype)
    qweight, packed_scales, _ = fmt.pack(codes.T.contiguous(), scales[..., 0].T.contiguous().to(dtype), group_size)
    layer.qweight.copy_(qweight)
    layer.scales.copy_(packed_scales)
    if bias is not None:
        layer.bias.copy_(bias.to(dtype))
    return layer


def quantize_rtn(model: nn.Module, group_size: int = 128) -> int:
    """Replace, in place, every quantizable linear of every decoder layer (configs/models.json) by its
    :func:`rtn_marlin`; returns how many. One layer's fp16 weight is freed as its MarlinLinear is made."""
    spec = arch_spec(model.config.model_type)
    count = 0
    for layer in model.get_submodule(spec.layers):
        for name in spec.linears:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, child)
            dtype = linear.weight.dtype if linear.weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
            with torch.no_grad():
                q = rtn_marlin(linear.weight, group_size, linear.bias, dtype=dtype)
            setattr(parent, child, q.to(linear.weight.dtype))
            count += 1
    return count


def synthetic_model(dims: dict[str, int], dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """A random Llama (weights ~N(0, 0.02), as transformers initializes it) of ``dims`` on ``device``.

    dims: hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers,
    vocab_size.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**dims, max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _baseline_source(checkpoint_dir: Path, baseline: str | None) -> tuple[str | None, str]:
    """Where the fp16 original comes from: (path or alias, how it was found); (None, reason) for random."""
    from marlin_cli.formats.folder import RUN_RECORD
    from marlin_cli.pipeline.models import BUILTIN_ALIASES

    if baseline is not None:
        return baseline, "--baseline"
    record_path = checkpoint_dir / RUN_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        source_dir, source = record.get("source_dir"), record.get("source_model")
        if source_dir and (Path(source_dir) / "config.json").is_file():
            return source_dir, "run record (source_dir)"
        if source in BUILTIN_ALIASES or (source and (Path(source) / "config.json").is_file()):
            return source, "run record (source_model)"
    return None, "random fp16 weights of the checkpoint's dimensions (source not found here)"


# ---------------------------------------------------------------------------------------------- timing


def _forward_kwargs(model: nn.Module, cache: object) -> dict:
    """The cache argument under the name this transformers version uses (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True, "logits_to_keep": 1}


class DecodeStep:
    """One greedy decode step of ``batch`` sequences on a static cache, with static input tensors.

    ``ids`` [B, 1] int64 (the next input tokens), ``pos`` [1, 1] int64 (their position) and, where the
    model's forward takes it, ``cache_position`` [1] live at fixed addresses; :meth:`__call__` runs the model,
    writes the argmax token into ``ids`` and advances the positions, all in place, so it can be captured in
    a CUDA graph and replayed. Returns the logits [B, 1, vocab].
    """

    def __init__(self, model: nn.Module, batch: int, context: int, max_len: int, seed: int = 0) -> None:
        from transformers import StaticCache

        self.model = model
        device = next(model.parameters()).device
        if context + 1 > max_len:
            raise ValueError(f"max_len {max_len} leaves no room to decode after a context of {context}")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.kwargs = _forward_kwargs(model, self.cache)
        self.has_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        gen = torch.Generator(device="cpu").manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
        extra = {"cache_position": torch.arange(context, device=device)} if self.has_cache_position else {}
        with torch.no_grad():
            logits = model(input_ids=prompt, position_ids=torch.arange(context, device=device)[None],
                           **extra, **self.kwargs).logits
        self.ids = logits[:, -1:].argmax(-1)  # [B, 1]
        self.pos = torch.full((1, 1), context, dtype=torch.long, device=device)
        self.cache_position = self.pos[0].clone() if self.has_cache_position else None

    def __call__(self) -> torch.Tensor:
        extra = {"cache_position": self.cache_position} if self.has_cache_position else {}
        with torch.no_grad():
            logits = self.model(input_ids=self.ids, position_ids=self.pos, **extra, **self.kwargs).logits
            self.ids.copy_(logits[:, -1:].argmax(-1))
            self.pos.add_(1)
            if self.cache_position is not None:
                self.cache_position.add_(1)
        return logits


def time_decode(model: nn.Module, batch: int, context: int, steps: int, rounds: int, graphs: bool = True,
                seed: int = 0) -> tuple[float, bool, str]:
    """Best-of-``rounds`` milliseconds per decode step (CUDA model), with a CUDA graph when ``graphs``.

    Returns (ms per step, whether a graph ran, a note: why graph capture fell back to eager, if it did).
    """
    warm = 3
    step = DecodeStep(model, batch, context, max_len=context + warm + 1 + rounds * steps + 2, seed=seed)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
        for _ in range(warm):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    run: Callable[[], object] = step
    used_graph, note = False, ""
    if graphs:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            run, used_graph = graph.replay, True
        except Exception as err:  # noqa: BLE001 - any capture failure: measure eagerly and say why
            note = f"graph capture failed, eager: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            torch.cuda.synchronize()
    best = math.inf
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / steps)
    del step, run
    return best, used_graph, note


# ---------------------------------------------------------------------------------------------- driver


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_bench(options: BenchOptions) -> BenchResult:
    """Measure every variant of ``options.variants`` at every batch and context; CUDA only.

    Raises MarlinError on a machine without CUDA (this measures the GPU) or for bad options.
    """
    if not options.device.startswith("cuda") or not torch.cuda.is_available():
        raise MarlinError("marlin bench measures decode speed on a CUDA GPU; no CUDA device is visible here")
    if (options.checkpoint is None) == (options.synthetic is None):
        raise MarlinError("give a checkpoint or --synthetic PRESET (one of them)")
    unknown = [v for v in options.variants if v not in VARIANTS]
    if unknown:
        raise MarlinError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    say = options.progress or (lambda _msg: None)
    device = options.device
    result = BenchResult(model={}, device=device_description(device), versions=versions(),
                         options={"batches": list(options.batches), "contexts": list(options.contexts),
                                  "steps": options.steps, "rounds": options.rounds, "graphs": options.graphs,
                                  "dtype": str(options.dtype).removeprefix("torch.")})

    def measure(model: nn.Module, variant: str) -> None:
        for context in options.contexts:
            for batch in options.batches:
                ms, graphed, note = time_decode(model, batch, context, options.steps, options.rounds,
                                                graphs=options.graphs, seed=options.seed)
                m = Measurement(variant, batch, context, ms, batch * 1000.0 / ms, graphed, note)
                result.measurements.append(m)
                say(f"{variant:13s} batch {batch:3d} context {context:5d}: {ms:.3f} ms/token, "
                    f"{m.tokens_per_s:.0f} tokens/s{' (' + note + ')' if note else ''}")
                _free()

    quantized_variants = [v for v in options.variants if v != "fp16"]
    if options.synthetic is not None:
        if options.synthetic not in PRESETS:
            raise MarlinError(f"--synthetic {options.synthetic!r}: choose from {', '.join(PRESETS)}")
        dims = dict(PRESETS[options.synthetic])
        if options.layers is not None:
            dims["num_hidden_layers"] = options.layers
        result.model = {"synthetic": options.synthetic, **dims, "group_size": options.group_size,
                        "weights": "random N(0, 0.02) fp16; Marlin variants are its round-to-nearest quantization"}
        model = synthetic_model(dims, options.dtype, device, options.seed)
        if "fp16" in options.variants:
            measure(model, "fp16")
        if quantized_variants:
            quantize_rtn(model, options.group_size)
            _free()
            _measure_quantized(model, quantized_variants, measure)
        del model
        _free()
        return result

    from marlin_cli.loading import load_model
    from marlin_cli.pipeline.models import resolve_model_dir

    checkpoint_dir = resolve_model_dir(options.checkpoint)
    loaded = load_model(options.checkpoint, device=device, dtype=options.dtype, **_no_fuse_kwargs(load_model))
    if not loaded.identity.get("is_quantized"):
        raise MarlinError(f"{options.checkpoint} is not a quantized checkpoint; `marlin bench` compares one "
                          "with its fp16 original")
    source, how = _baseline_source(checkpoint_dir, options.baseline)
    result.model = {"checkpoint": options.checkpoint, "path": str(checkpoint_dir),
                    "quantization_config": loaded.identity.get("quantization_config"),
                    "baseline": source, "baseline_from": how}
    model = loaded.model
    if is_fused(model):
        raise MarlinError("load_model returned an already fused model; cannot measure the unfused variant")
    if quantized_variants:
        _measure_quantized(model, quantized_variants, measure)
    config = model.config
    del model, loaded
    _free()
    if "fp16" in options.variants:
        if source is not None:
            base = load_model(source, device=device, dtype=options.dtype).model
        else:
            dims = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads", "num_hidden_layers", "vocab_size")}
            base = synthetic_model(dims, options.dtype, device, options.seed)
        measure(base, "fp16")
        del base
        _free()
    return result


def _no_fuse_kwargs(load: Callable) -> dict:
    """``{"fuse": False}`` where ``load_model`` takes a ``fuse`` argument (it fuses on CUDA by default)."""
    return {"fuse": False} if "fuse" in inspect.signature(load).parameters else {}


def _measure_quantized(model: nn.Module, variants: list[str], measure: Callable[[nn.Module, str], None]) -> None:
    """The unfused variant first, then the same model fused in place."""
    if "marlin" in variants:
        measure(model, "marlin")
    if "marlin-fused" in variants:
        if not fuse_model(model):
            raise MarlinError("no group of linears could be fused in this model")
        measure(model, "marlin-fused")


def summary_table(result: BenchResult | dict) -> str:
    """Markdown table: one row per (context, batch), ms/token and tokens/s per variant, speed-up over fp16."""
    rec = result.to_dict() if isinstance(result, BenchResult) else result
    rows_by_key: dict[tuple[int, int], dict[str, dict]] = {}
    for m in rec["measurements"]:
        rows_by_key.setdefault((m["context"], m["batch"]), {})[m["variant"]] = m
    variants = [v for v in VARIANTS if any(v in d for d in rows_by_key.values())]
    headers = ["context", "batch"]
    for v in variants:
        headers += [f"{v} ms/tok", f"{v} tok/s"] + ([f"{v} vs fp16"] if v != "fp16" and "fp16" in variants else [])
    rows = []
    for (context, batch), by_variant in sorted(rows_by_key.items()):
        row: list = [context, batch]
        base = by_variant.get("fp16")
        for v in variants:
            m = by_variant.get(v)
            row += [m["ms_per_token"] if m else None, round(m["tokens_per_s"]) if m else None]
            if v != "fp16" and "fp16" in variants:
                row.append(f"{base['ms_per_token'] / m['ms_per_token']:.2f}x" if m and base else None)
        rows.append(row)
    graphed = all(m["graphs"] for m in rec["measurements"])
    title = (f"decode on {rec['device']}, {rec['options'].get('dtype', '')}, "
             f"{'CUDA graphs' if graphed else 'some points without CUDA graphs (see notes)'}, "
             f"best of {rec['options'].get('rounds')} rounds of {rec['options'].get('steps')} steps")
    return title + "\n" + render_table(headers, rows, digits=3)


def now_utc() -> str:
    """The current time, ISO 8601 UTC (for the JSON record)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
