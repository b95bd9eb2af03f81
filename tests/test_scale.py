"""Bounded memory: process memory does not grow with depth, and calibration activations beyond the in-GPU
budget spill to (pinned) host memory without changing a single code. Each is checked for ``fast`` (the
default: the unquantized model's activations, one pass per layer) and ``gptq`` (the quantized model's
activations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.pipeline.synthetic import build_synthetic, layer_params
from marlin_cli.runtime import quantize_dtype
from marlin_cli.settings import QuantSettings

METHODS = ["fast", "gptq"]
"""The methods whose activation propagation differs (``best`` is ``fast``'s plus block tuning)."""

WIDE = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8}
"""Layers of 2.6 M weights (5.2 MB in fp16): big enough that holding every layer's codes (2.6 MB/layer) or
packed tensors until the end would show in the peak RSS of 8 layers against 2."""

PEAK_RSS = """
import json, resource, sys
from pathlib import Path
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings
model, out, method = sys.argv[1], sys.argv[2], sys.argv[4]
quantize(QuantizeJob(model, Path(out), QuantSettings(dataset="botchan", nsamples=4, seqlen=128, clip=False,
                                                     format="marlin", method=method)), progress=False,
         max_shard_bytes=int(sys.argv[3]))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _peak_rss(model: Path, out: Path, method: str, max_shard_bytes: int = 1 << 20) -> float:
    """Peak RSS (MiB) of a child process quantizing ``model``. Shards of 1 MiB: a model smaller than one shard
    is merged into one file at the end (a copy of the whole checkpoint in memory, bounded by the 2 GB shard
    size); larger models, the case this bound is for, keep one shard per layer, which is what is measured."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(model), str(out), str(max_shard_bytes),
                           method], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_peak_rss_does_not_grow_with_depth(builtin_model_dir: Path, tmp_path: Path, method: str) -> None:
    layer_mb = layer_params(512, 1024, 8, 8) * 2 / 2**20  # one layer in fp16: 5.0 MB
    peaks = {}
    for layers in (2, 8):
        model = build_synthetic(tmp_path / f"m{layers}", WIDE, layers, builtin_model_dir)
        peaks[layers] = _peak_rss(model, tmp_path / f"out{layers}", method)
    print(peaks, f"layer {layer_mb:.1f} MB")
    # Six more layers would add ~6 x (2.6 MB codes + 1.3 MB packed) = 23 MB if results were held to the end.
    assert peaks[8] - peaks[2] < 1.5 * layer_mb, peaks


@pytest.mark.parametrize("method", METHODS)
def test_activations_beyond_the_budget_spill_to_host_and_give_the_same_codes(builtin_model_dir: Path,
                                                                          tmp_path: Path, method: str) -> None:
    model = build_synthetic(tmp_path / "m", "tiny", 2, builtin_model_dir)
    # 20 windows of 512 tokens: two batches (16 + 4 windows of the 8192-token batches).
    base = {"dataset": "botchan", "nsamples": 20, "seqlen": 512, "group_size": 64, "format": "marlin",
            "method": method}
    # 4 MB holds the first batch in float32; the fast method's layers may run in bfloat16 (a bf16 CPU), whose
    # activations take half the bytes: the budget scales with the activations' element size.
    per = torch.empty((), dtype=quantize_dtype("cpu", method)).element_size() / 4
    runs = {}
    for label, budget in (("all on device", None), ("one batch on device", 0.004 * per), ("none on device", 0.0)):
        settings = QuantSettings(**base, activation_budget_gb=budget)
        runs[label] = quantize(QuantizeJob(str(model), tmp_path / label.replace(" ", "_"), settings), progress=False,
                               keep_matrices=True)
    assert [r.record["spilled_batches"] for r in runs.values()] == [0, 1, 2]
    ref = runs["all on device"].matrices
    for label, run in runs.items():
        assert run.matrices.keys() == ref.keys()
        for name, qm in run.matrices.items():
            assert torch.equal(qm.codes, ref[name].codes), (label, name)
            assert torch.equal(qm.scales, ref[name].scales), (label, name)


@pytest.mark.parametrize("method", METHODS)
def test_host_synchronisations_per_layer_do_not_grow_with_columns_or_linears(builtin_model_dir: Path,
                                                                           tmp_path: Path, method: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every read of a tensor's value by the host (``.item()``, ``.tolist()``, ``float(t)``...) stalls
    the queue; the solver may do a few per group of linears (the Cholesky's success, the damping used) and one
    per layer (the error report), never one per column or per linear."""
    model = build_synthetic(tmp_path / "m", "tiny", 2, builtin_model_dir)
    calls = {"n": 0, "paused": False}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        real = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _real=real, **kwargs: object) -> object:  # noqa: ANN001
            calls["n"] += not calls["paused"]
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    from marlin_cli.pipeline import quantize as q

    real_add = q._add_tensors

    def add_uncounted(*args: object, **kwargs: object) -> None:  # the writer encodes CPU tensors: not a GPU sync
        calls["paused"] = True
        try:
            real_add(*args, **kwargs)
        finally:
            calls["paused"] = False

    monkeypatch.setattr(q, "_add_tensors", add_uncounted)

    counts = []

    def after_layer(_i: int) -> None:
        counts.append(calls["n"])

    q.quantize(QuantizeJob(str(model), tmp_path / "out", QuantSettings(dataset="botchan", nsamples=2, seqlen=64,
                                                                       group_size=32, format="marlin",
                                                                       method=method)),
               progress=False, after_layer=after_layer)
    per_layer = counts[1] - counts[0]
    # 4 groups sharing a Hessian (q/k/v, o, gate/up, down) x (mean diag, 2 Cholesky checks, the damping used)
    # + 1 error report; 7 linears and 1,024 columns per layer here.
    assert per_layer <= 4 * 4 + 1, per_layer
