"""Reading bad files is one line and exit 2 (never a traceback); checkpoint files get the user's umask."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from checkpoint_cache import run_cli

from marlin_cli.errors import MarlinError
from marlin_cli.formats.folder import CheckpointWriter
from marlin_cli.pipeline.weights import WeightStore


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        with CheckpointWriter(tmp_path / "ckpt") as writer:
            writer.add("w", torch.zeros(4))
            out = writer.finish({"model_type": "llama"}, None, {"run": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~mask, {k: oct(v) for k, v in modes.items()}
    assert len(set(modes.values())) == 1, {k: oct(v) for k, v in modes.items()}  # same as its neighbours


@pytest.fixture
def truncated(builtin_model_dir: Path, tmp_path: Path) -> Path:
    """The built-in model folder with model.safetensors cut to half its size (an interrupted download)."""
    out = tmp_path / "cut"
    shutil.copytree(builtin_model_dir, out)
    f = out / "model.safetensors"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return out


@pytest.mark.parametrize("command", [["eval-ppl", "--dataset", "botchan", "--device", "cpu", "--quiet"],
                                     ["quantize", "--out", "{tmp}/q", "--nearest", "--quiet"]])
def test_truncated_safetensors_is_one_line_and_exit_2(truncated: Path, tmp_path: Path, command: list[str]) -> None:
    args = [command[0], truncated, *[a.format(tmp=tmp_path) for a in command[1:]]]
    code, output = run_cli(*args)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "model.safetensors" in lines[0] and "truncated" in lines[0], output
    assert not (tmp_path / "q").exists()


def test_garbage_safetensors_and_index_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(MarlinError, match=r"model\.safetensors is not a readable safetensors file"):
        WeightStore(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(MarlinError, match="not a valid safetensors index"):
        WeightStore(tmp_path)
