"""Helpers shared by the test modules: a Marlin checkpoint of the built-in model (made once per session), the
built-in model cut to a few layers, and the CLI run in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
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


def signed_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Issue 18's signed-scale grid, written here independently of the quantizer: per group of ``w`` [N, K]
    (``group_size`` columns, or all K for -1) the scale is ``s = fp16(-e / 8)`` with ``e`` the group's entry of
    largest magnitude, so ``e`` lands on the 16th level (code 0, ``q - 8 = -8``) and ``s`` is negative wherever
    ``e`` is positive (about half the groups); codes are ``clamp(round(w / s) + 8, 0, 15)``.

    Returns codes uint8 [N, K] and scales float64 [N, G] (fp16 values; 1 for an all-zero group)."""
    n, k = w.shape
    per = k if group_size == -1 else group_size
    w = w.to(torch.float64)
    scales = []
    for part in w.split(per, dim=1):
        extreme = part.gather(1, part.abs().argmax(dim=1, keepdim=True))[:, 0]
        scales.append((-extreme / 8).to(torch.float16).to(torch.float64))
    s = torch.stack(scales, 1)
    s = torch.where(s != 0, s, torch.ones_like(s))
    codes = torch.clamp(torch.round(w / s.repeat_interleave(per, dim=1)[:, :k]) + 8, 0, 15)
    return codes.to(torch.uint8), s


def signed_grid_random(n: int, k: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`signed_grid` of a random weight [N, K] (Gaussian, a random magnitude per row): codes uint8
    [N, K] and float32 scales [N, G], about half of them negative."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * (torch.rand(n, 1, generator=gen) * 0.05 + 1e-3)
    codes, scales = signed_grid(w, group_size)
    return codes, scales.float()
