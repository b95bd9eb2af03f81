"""``marlin eval-ppl`` on the built-in model: agreement with a direct transformers forward, JSON record, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import checkpoint_cache
import pytest
import torch
from click.testing import CliRunner

from marlin_cli.cli import main
from marlin_cli.data.corpora import eval_documents, eval_stream
from marlin_cli.errors import MarlinError
from marlin_cli.eval.ppl import measure, resolve_seqlen, summary_table
from marlin_cli.report import render_table
from marlin_cli.runtime import resolve_dtype


@pytest.fixture(scope="module")
def fp32_model(builtin_model_dir: Path) -> torch.nn.Module:
    """The built-in model loaded by transformers directly (not through marlin), in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32).eval()


def run_cli(*args: str) -> tuple[int, str]:
    """Invoke ``marlin ARGS``; returns (exit code, output)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_stream_ppl_equals_direct_transformers_forward(
    builtin_model_dir: Path, tokenizer, fp32_model: torch.nn.Module, tmp_path: Path
) -> None:
    out = tmp_path / "ppl.json"
    code, output = run_cli(
        "eval-ppl", str(builtin_model_dir), "--dataset", "botchan", "--seqlen", "256", "--max-windows", "3",
        "--device", "cpu", "--dtype", "float32", "--quiet", "--json", str(out),
    )  # fmt: skip
    assert code == 0, output
    rec = json.loads(out.read_text())

    # The same windows through transformers' own loss (labels shifted inside the model).
    tokens, info = eval_stream(tokenizer, "botchan")
    losses = []
    with torch.inference_mode():
        for w in range(3):
            ids = tokens[w * 256 : (w + 1) * 256].unsqueeze(0)
            losses.append(fp32_model(input_ids=ids, labels=ids).loss.double().item())
    direct = math.exp(sum(losses) / len(losses))  # equal windows: token mean = mean of window means
    assert rec["ppl"] == pytest.approx(direct, rel=1e-5)

    assert rec["protocol"] == "stream" and "stream" in output
    assert (rec["windows"], rec["documents"], rec["tokens_scored"], rec["seqlen"]) == (3, None, 3 * 255, 256)
    assert rec["dataset"]["sha256"] == info.sha256 and len(rec["dataset"]["sha256"]) == 64
    assert rec["dataset"]["name"] == "botchan" and rec["dataset"]["protocol"] == "stream"
    assert rec["model"]["is_quantized"] is False and rec["model"]["weights"]["sha256"]
    assert (rec["device"], rec["dtype"]) == ("cpu", "float32")
    assert rec["seconds"] > 0 and rec["nll_mean"] == pytest.approx(math.log(rec["ppl"]))
    assert {"marlin", "torch", "transformers", "python"} <= set(rec["versions"])


def test_documents_ppl_equals_direct_mean_of_document_means(tokenizer, fp32_model: torch.nn.Module) -> None:
    result, dataset = measure(fp32_model, tokenizer, "pydocs", 128, max_docs=4, progress=False)
    docs, info = eval_documents(tokenizer, "pydocs", 4, 128, 0)
    with torch.inference_mode():
        means = [fp32_model(input_ids=d[None], labels=d[None]).loss.double().item() for d in docs]
    assert result.ppl == pytest.approx(math.exp(sum(means) / len(means)), rel=1e-5)
    assert result.protocol == "documents" and dataset["protocol"] == "documents"
    assert (result.documents, result.windows, result.skipped_documents) == (4, None, 0)
    assert result.tokens_scored == sum(d.numel() - 1 for d in docs)
    assert dataset["sha256"] == info.sha256 and dataset["n_documents"] == 4


@pytest.mark.slow
def test_quantized_checkpoint_is_evaluated_and_identified(
    tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path, tokenizer, fp32_model: torch.nn.Module
) -> None:
    ckpt = checkpoint_cache.rtn_checkpoint(tmp_path_factory, builtin_model_dir)
    out = tmp_path_factory.mktemp("q") / "q.json"
    code, output = run_cli(
        "eval-ppl", str(ckpt), "--dataset", "botchan", "--seqlen", "256", "--max-windows", "2", "--device", "cpu",
        "--quiet", "--json", str(out),
    )  # fmt: skip
    assert code == 0, output
    q = json.loads(out.read_text())
    fp, dataset = measure(fp32_model, tokenizer, "botchan", 256, max_windows=2, progress=False)
    assert q["model"]["is_quantized"] is True and "int4" in output
    assert q["model"]["quantization_config"]["group_size"] == 64
    assert q["dataset"]["sha256"] == dataset["sha256"] and q["tokens_scored"] == fp.tokens_scored
    # 4-bit g64 round-to-nearest costs perplexity, but a working checkpoint stays within 2x of fp16.
    assert fp.ppl < q["ppl"] < 2 * fp.ppl


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/model"], "no/such/model"),
        (["{model}", "--dataset", "no-such-dataset"], "no-such-dataset"),
        (["{model}", "--seqlen", "1"], "seqlen"),
        (["{model}", "--seqlen", "100000"], "maximum"),
        (["{model}", "--max-windows", "0", "--seqlen", "64"], "max-windows"),
        (["{model}", "--device", "cuda:7"], "cuda"),
    ],
)
def test_bad_input_is_a_one_line_error(builtin_model_dir: Path, args: list[str], message: str) -> None:
    args = [a.format(model=builtin_model_dir) for a in args]
    code, output = run_cli("eval-ppl", *args, "--quiet")
    assert code == 2, output
    last = output.strip().splitlines()[-1]  # earlier lines: transformers' loading bar, if a model was loaded
    assert last.startswith("error:") and message in last and output.count("error:") == 1, output


def test_default_seqlen_is_4096_capped_by_the_model() -> None:
    def model(limit: int | None) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit))

    assert resolve_seqlen(None, model(8192)) == 4096
    assert resolve_seqlen(None, model(2048)) == 2048
    assert resolve_seqlen(None, model(None)) == 4096
    assert resolve_seqlen(1024, model(8192)) == 1024
    with pytest.raises(MarlinError, match="maximum of 2048"):
        resolve_seqlen(4096, model(2048))


def test_dtype_defaults_follow_the_device() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(MarlinError):
        resolve_dtype("int8", "cpu")


def test_summary_table_names_the_protocol() -> None:
    rec = {
        "protocol": "documents", "windows": None, "documents": 64, "tokens_scored": 60000, "ppl": 11.0123,
        "seconds": 12.34, "seqlen": 1024, "dataset": {"name": "pydocs", "sha256": "ab" * 32},
        "model": {"model": "smollm2-135m", "is_quantized": True}, "device_name": "cpu", "dtype": "float32",
    }  # fmt: skip
    table = summary_table(rec)
    assert "| documents |" in table.replace("  ", " ") or " documents " in table
    assert "11.01" in table and "int4" in table and "abababababab" in table
    assert render_table(["a", "b"], [[1.23456, None]], digits=3).splitlines()[2] == "| 1.235 | — |"
