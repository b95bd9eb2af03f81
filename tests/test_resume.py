"""Resume: a run interrupted after layer k continues with ``resume=True`` (``--resume``) and writes the very
checkpoint an uninterrupted run writes, bit for bit; a partial folder of other inputs is a one-line error.

Resumes are checked for both ways of carrying activations to the next layer: ``fast`` (the unquantized
model's activations, one pass per layer; a resumed run replays the finished layers with their original
weights) and ``gptq`` (the quantized model's activations; the finished layers are replayed from the journal's
codes and scales)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from marlin_cli.errors import MarlinError
from marlin_cli.formats.folder import RUN_RECORD, partial_dir
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.pipeline.synthetic import build_synthetic
from marlin_cli.settings import QuantSettings

LAYERS = 3
SETTINGS = QuantSettings(dataset="botchan", nsamples=4, seqlen=64, group_size=64, format="marlin")
METHODS = ["fast", "gptq"]
"""The methods whose activation propagation differs (``best`` is ``fast``'s plus block tuning)."""


def with_method(settings: QuantSettings, method: str, **changes: object) -> QuantSettings:
    return QuantSettings(**{**settings.to_dict(), "method": method, **changes})


class Interrupt(Exception):
    """Stands for Ctrl-C / preemption in the middle of a run."""


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file but the run record (whose timings differ from run to run)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.name != RUN_RECORD}


@pytest.fixture(scope="module")
def model(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("synthetic") / "tiny", "tiny", LAYERS, builtin_model_dir)


@pytest.fixture(scope="module")
def uninterrupted(model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The uninterrupted Marlin-format checkpoint of ``method``, made once per method."""
    made: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            made[method] = quantize(QuantizeJob(str(model), tmp_path_factory.mktemp("ref") / "ckpt",
                                                with_method(SETTINGS, method)), progress=False).out_dir
        return made[method]

    return get


def _kill_after(k: int):  # noqa: ANN202
    def hook(i: int) -> None:
        if i == k:
            raise Interrupt

    return hook


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", ["marlin", "compressed-tensors"])
def test_interrupted_then_resumed_run_is_bit_identical(model: Path, tmp_path: Path, fmt: str, method: str,
                                                       uninterrupted) -> None:  # noqa: ANN001
    settings = with_method(SETTINGS, method, format=fmt)
    ref = uninterrupted(method) if fmt == "marlin" else quantize(QuantizeJob(str(model), tmp_path / "ref", settings),
                                                                  progress=False).out_dir
    out = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        quantize(QuantizeJob(str(model), out, settings), progress=False, after_layer=_kill_after(1))
    assert not out.exists() and partial_dir(out).is_dir()  # kept for --resume, never looks whole
    resumed = quantize(QuantizeJob(str(model), out, settings, resume=True), progress=False)
    assert resumed.record["resumed_at_layer"] == 2
    assert len(resumed.record["layers"]) == LAYERS * 7  # the finished layers' reports come from the journal
    assert digests(resumed.out_dir) == digests(ref)
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("method", METHODS)
def test_sigkilled_run_resumes_bit_identical(model: Path, tmp_path: Path, method: str,
                                             uninterrupted) -> None:  # noqa: ANN001
    """An OOM kill or preemption gives no chance to clean up: SIGKILL in a child process after layer 1."""
    out = tmp_path / "ckpt"
    settings = with_method(SETTINGS, method)
    code = f"""
import os, signal
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings
def die(i):
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
quantize(QuantizeJob({str(model)!r}, {str(out)!r}, QuantSettings(**{settings.to_dict()!r})), progress=False,
         after_layer=die)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = quantize(QuantizeJob(str(model), out, settings, resume=True), progress=False)
    assert resumed.record["resumed_at_layer"] == 2
    assert digests(resumed.out_dir) == digests(uninterrupted(method))


def test_resume_with_other_settings_is_a_one_line_error_and_plain_rerun_starts_over(model: Path,
                                                                                    tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        quantize(QuantizeJob(str(model), out, SETTINGS), progress=False, after_layer=_kill_after(0))
    other = QuantSettings(**{**SETTINGS.to_dict(), "damp": 0.05})
    with pytest.raises(MarlinError, match=r"other inputs \(settings differ: damp 0.1 -> 0.05\)") as err:
        quantize(QuantizeJob(str(model), out, other, resume=True), progress=False)
    assert "\n" not in str(err.value)
    more = QuantSettings(**{**SETTINGS.to_dict(), "nsamples": 5})
    with pytest.raises(MarlinError, match="nsamples 4 -> 5"):
        quantize(QuantizeJob(str(model), out, more, resume=True), progress=False)
    # A partial of the default method (fast) is not resumed as GPTQ.
    with pytest.raises(MarlinError, match="method 'fast' -> 'gptq'"):
        quantize(QuantizeJob(str(model), out, with_method(SETTINGS, "gptq"), resume=True), progress=False)
    # Without --resume the partial is discarded and the run starts from layer 0.
    fresh = quantize(QuantizeJob(str(model), out, other), progress=False, after_layer=None)
    assert fresh.record["resumed_at_layer"] is None and fresh.out_dir.is_dir()
    assert not partial_dir(out).exists()


def test_bad_input_mid_run_leaves_no_partial(model: Path, tmp_path: Path) -> None:
    """A MarlinError (e.g. a failed Cholesky) would fail again on resume: no partial folder is kept."""
    out = tmp_path / "ckpt"

    def bad(i: int) -> None:
        raise MarlinError("bad input")

    with pytest.raises(MarlinError):
        quantize(QuantizeJob(str(model), out, SETTINGS), progress=False, after_layer=bad)
    assert not out.exists() and not partial_dir(out).exists()
