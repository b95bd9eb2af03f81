"""``marlin reproduce``: config reading, checks, report, orchestration (with stand-ins), and a small real run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import checkpoint_cache
import pytest
from click.testing import CliRunner

from marlin_cli.cli import main
from marlin_cli.errors import MarlinError
from marlin_cli.eval import reproduce as reproduce_mod
from marlin_cli.eval.reproduce import (
    ReproduceOptions,
    ReproductionFailed,
    apply_overrides,
    check_rows,
    raise_on_failure,
    reproduce,
)
from marlin_cli.eval.reproduce_config import DatasetSpec, load_config
from marlin_cli.eval.reproduce_report import render_markdown

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load_with_the_original_numbers_and_reasons() -> None:
    builtin = load_config("builtin")
    assert [d.name for d in builtin.datasets] == ["botchan", "pydocs"]
    assert all(d.seqlen == 1024 for d in builtin.datasets)
    assert (builtin.settings.dataset, builtin.settings.nsamples, builtin.settings.seqlen) == (
        "pydocs",
        64,
        512,
    )
    assert builtin.settings.group_size == 64 and builtin.dtype == "float32"
    assert builtin.models[0].reference["botchan"] == {"fp16": 32.07, "rtn": 41.88, "gptq": 39.92}
    assert builtin.models[0].reference["pydocs"] == {"fp16": 11.01, "rtn": 15.89, "gptq": 13.23}

    llama = load_config(str(CONFIGS / "reproduce_llama2.json"))
    assert [m.name for m in llama.models] == ["Llama-2-7B", "Llama-2-13B", "Llama-2-70B"]
    assert llama.models[0].reference["wikitext2"] == {"fp16": 5.12, "gptq": 5.27}
    assert llama.models[2].reference["redpajama"] == {"fp16": 4.74, "gptq": 4.81}
    assert llama.settings.group_size == 128 and llama.settings.nsamples == 256
    assert all(d.seqlen == 4096 for d in llama.datasets)
    for name in ("reproduce_builtin.json", "reproduce_llama2.json"):
        raw = json.loads((CONFIGS / name).read_text())
        assert raw["checks"]["_max_ppl_ratio"], "the bound must carry its reason"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(colour="red"), "unknown key"),
        (lambda c: c["datasets"][0].update(windows=3), "unknown key"),
        (lambda c: c.pop("checks"), "lacks"),
        (lambda c: c["calibration"].pop("nsamples"), "calibration"),
        (lambda c: c["models"][0]["reference"]["botchan"].update(awq=1.0), "unknown variant"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    raw = json.loads((CONFIGS / "reproduce_builtin.json").read_text())
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(MarlinError, match=message):
        load_config(str(path))
    with pytest.raises(MarlinError, match="no reproduce config named"):
        load_config("no-such-config")
    path.write_text("{not json")
    with pytest.raises(MarlinError, match="not valid JSON"):
        load_config(str(path))


def test_overrides_replace_bounds_and_zero_lifts_them() -> None:
    spec = DatasetSpec("botchan", 1024, max_windows=24)
    assert apply_overrides(spec, ReproduceOptions(out=Path("x"))) == spec
    assert apply_overrides(spec, ReproduceOptions(out=Path("x"), max_windows=0)).max_windows is None
    assert apply_overrides(spec, ReproduceOptions(out=Path("x"), max_windows=5, max_docs=3)).max_windows == 5
    docs = DatasetSpec("pydocs", 1024, max_docs=64)
    assert apply_overrides(docs, ReproduceOptions(out=Path("x"), max_windows=5, max_docs=3)) == DatasetSpec(
        "pydocs", 1024, max_windows=None, max_docs=3
    )
    with pytest.raises(MarlinError, match="no-such-corpus"):
        apply_overrides(DatasetSpec("no-such-corpus", 128), ReproduceOptions(out=Path("x")))


def fake_row(ppl: dict[str, dict[str, float]]) -> dict:
    """A table row as :func:`run_model` makes it, from ``ppl[variant][dataset]``."""
    variants = {}
    for variant, per_ds in ppl.items():
        datasets = {
            ds: {
                "ppl": value, "protocol": "stream" if ds == "botchan" else "documents",
                "windows": 4 if ds == "botchan" else None, "documents": None if ds == "botchan" else 8,
                "tokens_scored": 4092, "seqlen": 1024, "dataset": {"sha256": "f" * 64},
            }
            for ds, value in per_ds.items()
        }  # fmt: skip
        entry = {"datasets": datasets, "identity": {}, "seconds": 1.0}
        if variant != "fp16":
            entry["checkpoint"] = {"size_mb": 113.2, "quantize_seconds": 5.0, "path": "/x"}
        variants[variant] = entry
    return {"name": "SmolLM2-135M", "path": "smollm2-135m", "variants": variants}


def test_checks_pass_and_fail_as_stated() -> None:
    config = load_config("builtin")  # bound 1.35, GPTQ must beat RTN
    good = fake_row({"fp16": {"botchan": 32.0}, "rtn": {"botchan": 42.0}, "gptq": {"botchan": 40.0}})
    assert all(c["passed"] for c in check_rows(config, [good]))
    worse = fake_row({"fp16": {"botchan": 32.0}, "rtn": {"botchan": 41.0}, "gptq": {"botchan": 41.5}})
    failed = [c["check"] for c in check_rows(config, [worse]) if not c["passed"]]
    assert failed == ["gptq < rtn"]
    far = fake_row({"fp16": {"botchan": 32.0}, "rtn": {"botchan": 60.0}, "gptq": {"botchan": 44.0}})
    failed = [c for c in check_rows(config, [far]) if not c["passed"]]
    assert [c["check"] for c in failed] == ["gptq / fp16 <= 1.35"] and "1.375" in failed[0]["detail"]
    record = {"config": "builtin", "checks": check_rows(config, [far])}
    with pytest.raises(ReproductionFailed, match="SmolLM2-135M/botchan: gptq / fp16 <= 1.35 failed"):
        raise_on_failure(record, Path("t.md"))


def stand_in_pipeline(monkeypatch: pytest.MonkeyPatch, ppl: dict[str, dict[str, float]]) -> list[str]:
    """Replace quantization and evaluation by stand-ins returning ``ppl[variant][dataset]``; logs the calls."""
    calls: list[str] = []

    def fake_quantize(config, model_path, out, nearest, device, progress):  # noqa: ANN001, ANN202
        calls.append(f"quantize {'rtn' if nearest else 'gptq'} {out.name}")
        return {"path": str(out), "size_mb": 100.0, "quantize_seconds": 2.0}

    def fake_evaluate(path, datasets, seed, device, dtype, progress, log):  # noqa: ANN001, ANN202
        variant = "fp16" if path == "smollm2-135m" else Path(path).name
        calls.append(
            f"evaluate {variant} {[d.name for d in datasets]} {[(d.max_windows, d.max_docs) for d in datasets]}"
        )
        row = fake_row({variant: ppl[variant]})["variants"][variant]
        return {"identity": {"model": path}, "datasets": row["datasets"]}

    monkeypatch.setattr(reproduce_mod, "_quantize", fake_quantize)
    monkeypatch.setattr(reproduce_mod, "_evaluate", fake_evaluate)
    return calls


def test_reproduce_runs_each_variant_and_writes_markdown_and_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ppl = {
        "fp16": {"botchan": 32.0, "pydocs": 11.0},
        "rtn": {"botchan": 42.0, "pydocs": 16.0},
        "gptq": {"botchan": 40.0, "pydocs": 13.0},
    }
    calls = stand_in_pipeline(monkeypatch, ppl)
    record = reproduce(
        load_config("builtin"), ReproduceOptions(out=tmp_path, device="cpu", max_docs=5), log=lambda m: None
    )
    assert calls == [
        "evaluate fp16 ['botchan', 'pydocs'] [(16, None), (None, 5)]",
        "quantize rtn rtn",
        "evaluate rtn ['botchan', 'pydocs'] [(16, None), (None, 5)]",
        "quantize gptq gptq",
        "evaluate gptq ['botchan', 'pydocs'] [(16, None), (None, 5)]",
    ]
    assert record["passed"] and len(record["checks"]) == 4
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["rows"][0]["variants"]["gptq"]["datasets"]["pydocs"]["ppl"] == 13.0
    assert saved["rows"][0]["reference"]["botchan"]["gptq"] == 39.92
    md = (tmp_path / "table.md").read_text()
    assert md == render_markdown(saved) + "\n"
    header = md.split("| model")[1].splitlines()[0]
    for column in (
        "botchan fp16",
        "botchan RTN",
        "botchan GPTQ",
        "botchan GPTQ (orig)",
        "pydocs RTN (orig)",
        "GPTQ MB",
    ):
        assert column in header
    assert "| SmolLM2-135M |" in md.replace("  ", " ") or "SmolLM2-135M " in md
    assert "39.92" in md and "stream" in md and "documents" in md and "bounded to 16" in md


def test_cli_fails_with_exit_2_when_gptq_loses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ppl = {
        "fp16": {"botchan": 32.0, "pydocs": 11.0},
        "rtn": {"botchan": 42.0, "pydocs": 13.0},
        "gptq": {"botchan": 40.0, "pydocs": 14.0},
    }
    stand_in_pipeline(monkeypatch, ppl)
    result = CliRunner().invoke(main, ["reproduce", "--out", str(tmp_path), "--device", "cpu", "--quiet"])
    assert result.exit_code == 2
    assert "SmolLM2-135M/pydocs: gptq < rtn failed (GPTQ 14.000 vs RTN 13.000)" in result.output
    assert (tmp_path / "table.md").is_file() and "FAIL" in (tmp_path / "table.md").read_text()


def test_rtn_column_reads_no_calibration_data_and_the_report_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 17: the table and report said RTN used calibration data "for its error report"; it uses none."""
    jobs = []

    def fake_quantize(job, progress):  # noqa: ANN001, ANN202
        jobs.append(job)
        job.out.mkdir(parents=True)
        nsamples = 0 if job.settings.nearest else job.settings.nsamples
        record = {"dataset": job.settings.dataset, "nsamples": nsamples, "seqlen": job.settings.seqlen, "seed": 0}
        return SimpleNamespace(out_dir=job.out, seconds=1.0, record=record)

    monkeypatch.setattr(reproduce_mod, "quantize", fake_quantize)
    config = load_config("builtin")
    rtn = reproduce_mod._quantize(config, "smollm2-135m", tmp_path / "rtn", True, "cpu", False)
    gptq = reproduce_mod._quantize(config, "smollm2-135m", tmp_path / "gptq", False, "cpu", False)
    assert [j.settings.nearest for j in jobs] == [True, False]
    assert jobs[0].settings == replace(config.settings, nearest=True, device="cpu")  # the same settings otherwise
    assert rtn["calibration"].startswith("none") and gptq["calibration"].startswith("pydocs 64 x <= 512")
    assert not hasattr(reproduce_mod, "RTN_NSAMPLES") and not hasattr(reproduce_mod, "RTN_SEQLEN")
    ppl = {"fp16": {"botchan": 32.0}, "rtn": {"botchan": 42.0}, "gptq": {"botchan": 40.0}}
    record = {"config": "builtin", "config_path": "x", "description": "", "reference_source": "",
              "datasets": [{"name": "botchan", "seqlen": 1024, "max_windows": 4, "max_docs": None}],
              "settings": config.settings.to_dict(), "dtype": "float32", "device_name": "cpu",
              "rows": [{**fake_row(ppl), "reference": {}}], "checks": check_rows(config, [fake_row(ppl)]), "seconds": 1.0, "command": "marlin",
              "versions": {}}  # fmt: skip
    md = render_markdown(record)
    assert "RTN rounds each weight to the nearest grid point" in md and "reads no calibration data" in md
    assert "error report" not in md


def test_unknown_model_selection_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["reproduce", "--model", "GPT-5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no model named ['GPT-5']" in result.output


@pytest.mark.slow
def test_small_real_reproduction(builtin_model_dir: Path, tmp_path: Path) -> None:
    """The whole pipeline through the CLI on real weights and text, shrunk to fit the test budget: the first
    4 of the built-in model's 30 layers, calibration 8 x 256, 4 windows and 8 documents of 256 tokens."""
    raw = json.loads((CONFIGS / "reproduce_builtin.json").read_text())
    raw["name"] = "builtin-small"
    raw["models"][0]["path"] = str(checkpoint_cache.shallow_copy(builtin_model_dir, tmp_path / "smollm2-4layers", 4))
    raw["calibration"].update(nsamples=8, seqlen=256)
    raw["datasets"] = [
        {"name": "botchan", "seqlen": 256, "max_windows": 4},
        {"name": "pydocs", "seqlen": 256, "max_docs": 8},
    ]
    # A 4-layer cut of a 30-layer model is no language model (ppl ~1e8): check the wiring, not quality
    # (the built-in reproduction checks quality on the whole model).
    raw["checks"] = {"gptq_beats_rtn": False, "max_ppl_ratio": 10.0}
    config = tmp_path / "small.json"
    config.write_text(json.dumps(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["reproduce", "--config", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rec = json.loads((out / "table.json").read_text())
    row = rec["rows"][0]["variants"]
    for ds in ("botchan", "pydocs"):
        fp, rtn, gptq = (row[v]["datasets"][ds]["ppl"] for v in ("fp16", "rtn", "gptq"))
        assert all(math.isfinite(p) and p > 1 for p in (fp, rtn, gptq))
        assert len({fp, rtn, gptq}) == 3  # each variant is a different model
        assert (
            row["gptq"]["datasets"][ds]["dataset"]["sha256"]
            == row["fp16"]["datasets"][ds]["dataset"]["sha256"]
        )
    assert [c["check"] for c in rec["checks"]] == ["gptq / fp16 <= 10.0"] * 2
    assert row["gptq"]["identity"]["is_quantized"] and row["fp16"]["identity"]["is_quantized"] is False
    qc = row["gptq"]["identity"]["quantization_config"]  # the default format, compressed-tensors
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert 20 < row["gptq"]["checkpoint"]["size_mb"] < 80  # 4 int4 layers + the fp16 embedding (57 MB)
    assert (
        row["rtn"]["datasets"]["botchan"]["windows"] == 4
        and row["rtn"]["datasets"]["pydocs"]["documents"] == 8
    )
    assert "SmolLM2-135M" in (out / "table.md").read_text() and rec["passed"]
