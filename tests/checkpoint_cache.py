"""Helpers shared by the test modules: a Marlin checkpoint of the built-in model (made once per session), the
built-in model cut to a few layers, and the CLI run in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from marlin_cli.cli import main
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings


def run_cli(*args: object) -> tuple[int, str]:
    """``marlin ARGS`` in-process; returns (exit code, everything printed)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def rtn_checkpoint(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """Round-to-nearest g64 Marlin checkpoint of the model in ``model_dir``, cached in the session's temp root.

    Round to nearest reads no calibration data: it is the cheapest real checkpoint the quantizer writes.
    """
    out = tmp_path_factory.getbasetemp() / "shared-rtn-g64"
    if not (out / "config.json").is_file():
        quantize(QuantizeJob(model=str(model_dir), out=out, settings=QuantSettings(group_size=64, nearest=True,
                                                                                  format="marlin")),
                 progress=False)
    return out


def shallow_copy(model_dir: Path, out: Path, layers: int) -> Path:
    """The built-in model cut to its first ``layers`` decoder layers (real weights, same tokenizer)."""
    out.mkdir()
    tensors = load_file(model_dir / "model.safetensors")
    keep = {
        k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    save_file(keep, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out
