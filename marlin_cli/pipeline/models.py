"""Where a model comes from, and what its architecture looks like to the quantizer (as data: configs/models.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

from marlin_cli.data.assets import builtin_model_dir
from marlin_cli.errors import MarlinError

BUILTIN_ALIASES = ("smollm2-135m",)
"""Model names that resolve to the offline assets fetched by ``marlin fetch-assets``."""


@dataclass(frozen=True)
class ArchSpec:
    """The names the quantizer needs for one architecture (see configs/models.json for their meaning)."""

    model_type: str
    layers: str
    rotary: str
    sequential: tuple[tuple[str, ...], ...]
    kv: tuple[str, ...]

    @property
    def linears(self) -> tuple[str, ...]:
        """All quantized linears of one decoder layer, in true-sequential order."""
        return tuple(name for group in self.sequential for name in group)


def _configs_text(name: str) -> str:
    try:
        return resources.files("marlin_configs").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / "configs" / name).read_text()


def arch_spec(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` for ``model_type``; a MarlinError naming the supported types otherwise."""
    table = json.loads(_configs_text("models.json"))["architectures"]
    if model_type not in table:
        raise MarlinError(f"model type '{model_type}' is not supported; supported: {', '.join(sorted(table))}. "
                          "A Llama-like decoder can be added as data in configs/models.json")
    entry = table[model_type]
    if "same_as" in entry:
        entry = table[entry["same_as"]]
    return ArchSpec(model_type, entry["layers"], entry["rotary"],
                    tuple(tuple(g) for g in entry["sequential"]), tuple(entry["kv"]))


def resolve_model_dir(model: str) -> Path:
    """A local folder for ``model``: a built-in alias, a local Hugging Face folder, or a hub id (downloaded).

    Raises MarlinError when it is none of these or the hub cannot be reached.
    """
    if model in BUILTIN_ALIASES:
        return builtin_model_dir()
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MarlinError(f"{path} has no config.json: give a Hugging Face model folder, a hub id, "
                              f"or one of {', '.join(BUILTIN_ALIASES)}")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise MarlinError(f"model '{model}' is neither a local folder, a hub id (owner/name), "
                          f"nor one of {', '.join(BUILTIN_ALIASES)}")
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many types (offline, 404, auth)
        raise MarlinError(f"could not fetch '{model}' from the Hugging Face Hub ({type(err).__name__}: {err}); "
                          "download it to a local folder and pass the folder") from err


def meta_model(config):  # noqa: ANN001, ANN201 - transformers config / model types
    """An empty (meta-device) causal LM for ``config``: the module tree without memory, to be filled tensor by tensor."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def rebuild_rotary(model, spec: ArchSpec, device: str = "cpu") -> None:  # noqa: ANN001
    """Re-create the rotary-embedding module on ``device``: its buffers come from the config, not the checkpoint."""
    parent_name, _, child = spec.rotary.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    with torch.device(device):  # constructor signatures differ across transformers versions; config is common
        setattr(parent, child, type(old)(config=model.config))


def meta_tensors(model) -> list[str]:  # noqa: ANN001
    """Names of parameters and buffers still on the meta device (i.e. never loaded)."""
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
