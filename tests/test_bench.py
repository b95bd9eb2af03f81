"""``marlin bench`` on the CPU: it refuses in one line; its parts (RTN quantization, the static-cache decode
step, the table, the fp16 baseline's lookup) are checked here, the timing itself on a GPU only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from gptq import format as fmt
from gptq.quantizer import fake_quantize, row_scales
from marlin_cli.cli import main
from marlin_cli.eval.bench import (
    DecodeStep,
    _baseline_source,
    quantize_rtn,
    rtn_marlin,
    summary_table,
)
from marlin_cli.fuse import fuse_model


def test_bench_refuses_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["bench", "smollm2-135m"], ["bench", "--synthetic", "llama2-7b", "--device", "cpu"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: marlin bench measures decode speed on a CUDA GPU")


@pytest.mark.parametrize("g", [64, -1, 32])
def test_rtn_marlin_is_round_to_nearest(g: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=gen) * 0.02
    layer = rtn_marlin(w, g, dtype=torch.float16)
    per = 200 if g == -1 else g
    groups = -(-200 // per)
    wg = torch.nn.functional.pad(w, (0, groups * per - 200)).reshape(96, groups, per)
    want = fake_quantize(wg, row_scales(wg)).reshape(96, -1)[:, :200]
    got = fmt.dequantize(layer.qweight, layer.scales, g, torch.float32)[:200, :96].T
    assert torch.equal(got, want)


def _small_quantized(model_dir: Path, fused: bool):  # noqa: ANN202 - a transformers model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    quantize_rtn(model, 64)
    model.float()
    if fused:
        assert fuse_model(model)
    return model


class _HostSyncs(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (they break CUDA-graph capture)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_step_matches_a_full_forward_and_reads_nothing_on_the_host(builtin_model_dir: Path) -> None:
    model = _small_quantized(builtin_model_dir, fused=True)
    step = DecodeStep(model, batch=3, context=12, max_len=20, seed=1)
    prompt = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([prompt, step.ids.clone()], 1)
    for _ in range(2):
        with _HostSyncs() as spy:
            logits = step()
        assert spy.seen == []  # capturable: no value of a device tensor goes to the host
        with torch.no_grad():
            full = model(input_ids=tokens).logits[:, -1:]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        assert torch.equal(step.ids, full.argmax(-1))
        tokens = torch.cat([tokens, step.ids.clone()], 1)
    assert step.pos.item() == 14


def test_summary_table_and_baseline_lookup(tmp_path: Path, builtin_model_dir: Path) -> None:
    rec = {"device": "NVIDIA H100 80GB HBM3", "options": {"dtype": "float16", "rounds": 3, "steps": 50},
           "measurements": [
               {"variant": v, "batch": b, "context": 512, "ms_per_token": ms, "tokens_per_s": b * 1000 / ms,
                "graphs": True, "note": ""}
               for v, b, ms in [("fp16", 1, 10.0), ("marlin", 1, 5.0), ("marlin-fused", 1, 4.0), ("fp16", 8, 12.0),
                                ("marlin", 8, 8.0), ("marlin-fused", 8, 6.0)]]}
    table = summary_table(rec)
    assert "NVIDIA H100 80GB HBM3" in table and "CUDA graphs" in table
    assert "| 512     | 1     | 10.000" in table and "2.50x" in table and "2.00x" in table
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert _baseline_source(ckpt, None)[0] is None
    assert _baseline_source(ckpt, "some/dir") == ("some/dir", "--baseline")
    (ckpt / "marlin_run.json").write_text(json.dumps({"source_model": "smollm2-135m", "source_dir": "/nowhere"}))
    assert _baseline_source(ckpt, None)[0] == "smollm2-135m"
    (ckpt / "marlin_run.json").write_text(json.dumps({"source_model": "x", "source_dir": str(builtin_model_dir)}))
    assert _baseline_source(ckpt, None) == (str(builtin_model_dir), "run record (source_dir)")


def _cpu_as_gpu(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """run_bench's flow on the CPU: CUDA reported present, models built on the CPU in float32, and each timing
    replaced by one real decode step (prefill, step) that returns 1 ms."""
    from marlin_cli import loading
    from marlin_cli.eval import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "device_description", lambda _device: "test CPU")
    monkeypatch.setattr(bench, "_free", lambda: None)
    build = bench.synthetic_model
    monkeypatch.setattr(bench, "synthetic_model", lambda dims, _dtype, _device, seed=0: build(dims, torch.float32,
                                                                                             "cpu", seed))
    load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda path, device, dtype, **kw: load(path, "cpu", torch.float32, **kw))

    def fake_time(model, batch, context, steps, rounds, graphs=True, seed=0):  # noqa: ANN001, ANN202
        step = DecodeStep(model, batch, context, context + 2, seed)
        step()
        calls.append((bench.is_fused(model), batch, context))
        return 1.0, graphs, ""

    monkeypatch.setattr(bench, "time_decode", fake_time)


def test_run_bench_flow_synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    from marlin_cli.eval import bench

    calls: list = []
    _cpu_as_gpu(monkeypatch, calls)
    dims = {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 512}
    monkeypatch.setitem(bench.PRESETS, "test", dims)
    result = bench.run_bench(bench.BenchOptions(synthetic="test", batches=(1, 2), contexts=(8,), group_size=64))
    assert [m.variant for m in result.measurements] == ["fp16"] * 2 + ["marlin"] * 2 + ["marlin-fused"] * 2
    assert calls == [(False, 1, 8), (False, 2, 8), (False, 1, 8), (False, 2, 8), (True, 1, 8), (True, 2, 8)]
    assert result.measurements[1].tokens_per_s == 2000.0
    assert "1.00x" in summary_table(result)


def test_run_bench_flow_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, builtin_model_dir: Path) -> None:
    from checkpoint_cache import shallow_copy

    from marlin_cli.eval.bench import BenchOptions, run_bench
    from marlin_cli.pipeline.quantize import QuantizeJob, quantize
    from marlin_cli.settings import QuantSettings

    small = shallow_copy(builtin_model_dir, tmp_path / "small", layers=1)
    ckpt = tmp_path / "ckpt"
    quantize(QuantizeJob(model=str(small), out=ckpt, settings=QuantSettings(group_size=64, nearest=True,
                                                                              format="marlin")), progress=False)
    calls: list = []
    _cpu_as_gpu(monkeypatch, calls)
    result = run_bench(BenchOptions(checkpoint=str(ckpt), batches=(1,), contexts=(4,)))
    assert result.model["baseline"] == str(small) and result.model["baseline_from"] == "run record (source_dir)"
    assert [(m.variant, f) for m, (f, _b, _c) in zip(result.measurements, calls, strict=True)] == [
        ("marlin", False), ("marlin-fused", True), ("fp16", False)]
