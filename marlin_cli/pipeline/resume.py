"""Resuming an interrupted ``marlin quantize`` from its last finished decoder layer (``--resume``).

The partial folder (``.<out>.partial-run``, see :class:`marlin_cli.formats.folder.CheckpointWriter`) holds
one safetensors part per finished layer, the non-layer tensors, and a journal with the run's settings, the
per-layer reports and a hash of everything the codes depend on (:func:`inputs_hash`: the source model's
fingerprint, the settings that change results, the calibration token ids). A resumed run whose inputs
hash differs stops with one line naming what differs.

How the calibration activations at the resume layer come back: **recomputed**, by running the finished
layers forward with the weights decoded from their written codes (:func:`replay_layer`). The alternative,
saving the activations per finished layer, costs (tokens x hidden x 2 bytes) per save: 4.3 GB per layer
for a 70B model at 128 x 2048 tokens, 17 GB at 256 x 4096, i.e. several seconds of disk writes per layer
and a partial folder as large as the model itself, for a resume that happens rarely. The replay costs one
forward pass per finished layer (about 1/5 of a layer's quantization time on a GPU, no solve), reads only
what is already on disk, and is exact: the decoded weights are the very values the uninterrupted run
used, ``(codes - 8) * scales`` in float32 cast to the model dtype, so the activations and every later code
are bit for bit those of an uninterrupted run (tests/test_resume.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file

from gptq.format import padded_shape, unpack
from marlin_cli.errors import MarlinError
from marlin_cli.formats.base import CodesLinear, PackedLinear
from marlin_cli.formats.folder import JOURNAL
from marlin_cli.loading import weights_fingerprint
from marlin_cli.settings import QuantSettings

RESULT_NEUTRAL = ("device", "activation_budget_gb")
"""Settings that do not enter the inputs hash: where the run goes and how activations are placed do not
change the codes (``device`` is kept as cpu vs cuda, since the compute dtype differs)."""


def settings_for_hash(settings: QuantSettings) -> dict:
    """The settings that change results, JSON-ready (``device`` reduced to ``cpu``/``cuda``)."""
    d = {k: v for k, v in settings.to_dict().items() if k not in RESULT_NEUTRAL}
    d["device_type"] = "cuda" if settings.device.startswith("cuda") else "cpu"
    return d


def inputs_hash(model_dir: Path, settings: QuantSettings, samples: list[torch.Tensor]) -> str:
    """sha256 over the model's fingerprint (config.json and the safetensors files: content when small,
    headers and sizes when large), :func:`settings_for_hash` and every calibration token id."""
    h = hashlib.sha256()
    h.update((Path(model_dir) / "config.json").read_bytes())
    h.update(json.dumps(weights_fingerprint(Path(model_dir)), sort_keys=True).encode())
    h.update(json.dumps(settings_for_hash(settings), sort_keys=True).encode())
    for ids in samples:
        t = ids.reshape(-1).to(torch.int64).contiguous()
        h.update(str(t.numel()).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_journal(journal: dict, expected_hash: str, settings: QuantSettings, where: Path) -> None:
    """Raise a one-line :class:`MarlinError` when a partial run was made from other inputs."""
    if journal.get("inputs_sha256") in (None, expected_hash):
        return
    theirs = journal.get("settings_for_hash", {})
    ours = settings_for_hash(settings)
    diff = [f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)]
    what = "settings differ: " + ", ".join(diff) if diff else "the model's weights or the calibration tokens differ"
    raise MarlinError(f"--resume: the partial checkpoint {where} was made from other inputs ({what}); "
                      "rerun without --resume to start over")


def layers_done(journal: dict) -> int:
    """How many decoder layers the journal records as written (0 for a fresh run)."""
    return int(journal.get("layers_done", 0))


def read_journal(partial: Path) -> dict:
    """The journal of a partial folder, or {} when there is none."""
    path = Path(partial) / JOURNAL
    return json.loads(path.read_text()) if path.is_file() else {}


class _DictSource:
    """A :class:`marlin_cli.formats.TensorSource` over a dict of tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def names(self) -> list[str]:
        return list(self.tensors)


def replay_layer(partial: Path, journal: dict, layer: int, modules: list[str], codec: ModuleType,
                 settings: QuantSettings, prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Codes uint8 [N, K] and scales float32 [N, G] of layer ``layer``'s quantized linears, read back through
    the format's own ``read`` from the layer's part. Keys: names within the layer (``self_attn.q_proj``)."""
    key = f"layer-{layer:05d}"
    part = next((p for p in journal["parts"] if p["key"] == key), None)
    if part is None:
        raise MarlinError(f"--resume: {partial} lacks the part of layer {layer}; rerun without --resume")
    tensors = load_file(str(Path(partial) / part["file"]))
    qc = codec.quantization_config(settings, modules)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for item in codec.read(_DictSource(tensors), qc):
        codes, scales = _codes_scales(item)
        out[item.name[len(prefix) + 1:]] = (codes, scales)
    return out


def _codes_scales(item: PackedLinear | CodesLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K], scales float32 [N, G]) of a linear as a format reads it back."""
    if isinstance(item, PackedLinear):
        shape = padded_shape(item.in_features, item.out_features, item.group_size)
        codes, scales = unpack(item.qweight, item.scales, shape)  # [K, N], [G, N]
        return codes.T.to(torch.uint8).contiguous(), scales.T.to(torch.float32).contiguous()
    return item.codes.to(torch.uint8), item.scales.to(torch.float32)
