"""Several processes (``torchrun``-style, gloo on the CPU) quantize one model together: calibration batches
dealt out over the ranks, Hessians all-reduced, each linear group solved on one rank and broadcast, only rank
0 writing. With two calibration batches over two ranks the Hessian sums are the same float32 terms in the same
order up to commutation, so the checkpoint is bit for bit the one-process checkpoint. The same holds for the
default method, ``fast``, whose statistic (the mean squared input per feature) is all-reduced the same way;
``best`` (block tuning, one process only) is refused under torchrun with a one-line error."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from marlin_cli.formats.folder import RUN_RECORD
from marlin_cli.pipeline.synthetic import build_synthetic

RUN = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings
# 12 windows of 1024 tokens: two calibration batches (8 + 4 windows)
settings = QuantSettings(dataset="botchan", nsamples=12, seqlen=1024, group_size=64, format="marlin",
                         method=sys.argv[3])
res = quantize(QuantizeJob(sys.argv[1], Path(sys.argv[2]), settings), progress=False)
print("world", res.record["world_size"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], world: int) -> list[subprocess.Popen]:
    """Start ``world`` processes of ``command`` as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        else:
            env.pop("WORLD_SIZE", None)
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _launch(model: Path, out: Path, world: int, method: str) -> list[str]:
    """Quantize ``model`` with ``world`` processes; their stdout."""
    procs = _start([sys.executable, "-c", RUN, str(model), str(out), method], world)
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(stdout)
    return outs


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.name != RUN_RECORD}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fast", "gptq"])
def test_two_gloo_ranks_write_the_one_process_checkpoint(builtin_model_dir: Path, tmp_path: Path,
                                                         method: str) -> None:
    model = build_synthetic(tmp_path / "m", "tiny", 2, builtin_model_dir)
    one = _launch(model, tmp_path / "one", 1, method)
    two = _launch(model, tmp_path / "two", 2, method)
    assert "world 1" in one[0] and all("world 2" in o for o in two)
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    assert not any(p.name.startswith(".two") for p in tmp_path.iterdir())  # rank 1 wrote nothing beside it


def test_best_under_torchrun_is_a_one_line_error(builtin_model_dir: Path, tmp_path: Path) -> None:
    """``--method best`` tunes blocks in one process: with two ranks every rank stops with one line, no
    traceback, and nothing is written."""
    model = build_synthetic(tmp_path / "m", "tiny", 2, builtin_model_dir)
    command = [sys.executable, "-c", "from marlin_cli.cli import main; main()", "quantize", str(model), "--out",
               str(tmp_path / "best"), "--method", "best", "--dataset", "botchan", "--nsamples", "4", "--seqlen",
               "64", "--quiet"]
    for p in _start(command, 2):
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode != 0, (stdout, stderr)
        said = (stdout + stderr).strip()
        assert "--method best" in said and "torchrun" in said, said
        assert "Traceback" not in said and len(said.splitlines()) == 1, said
    assert not any(p.name.startswith((".best", "best")) for p in tmp_path.iterdir())
