"""lm-evaluation-harness through its public HFLM interface, on a Marlin checkpoint, offline.

The task is ``tests/lm_eval_tasks/marlin_tiny_facts.yaml``: eight hand-made multiple-choice items in a
local JSONL file, so nothing is downloaded. Checks: the adapter's log-likelihoods equal a direct forward
of the same model, and lm-eval's accuracy equals the accuracy computed from those direct numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install 'marlin[eval]'")

import checkpoint_cache  # noqa: E402  (tests/checkpoint_cache.py)

from marlin_cli.cli import main  # noqa: E402
from marlin_cli.eval.lm_eval_adapter import lm_eval_model, metric_rows  # noqa: E402
from marlin_cli.loading import load_model  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny task's YAML with its ``data_files`` made absolute (lm-eval resolves them from the cwd)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "tiny_facts.jsonl"
    shutil.copy(TASKS / "tiny_facts.jsonl", data)
    yaml = (TASKS / "marlin_tiny_facts.yaml").read_text().replace("test: tiny_facts.jsonl", f"test: {data}")
    (folder / "marlin_tiny_facts.yaml").write_text(yaml)
    return folder


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> Path:
    """The session's RTN g64 Marlin checkpoint of the built-in model (see checkpoint_cache.py)."""
    return checkpoint_cache.rtn_checkpoint(tmp_path_factory, builtin_model_dir)


def direct_loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:  # noqa: ANN001
    """Sum of log p(continuation tokens | context) from one forward pass, in float64."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


@pytest.fixture(scope="module")
def loaded(rtn_checkpoint: Path):  # noqa: ANN201 (LoadedModel)
    """The checkpoint loaded on the CPU in float32 (MarlinLinear reference path)."""
    return load_model(str(rtn_checkpoint), device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_adapter_loglikelihood_equals_a_direct_forward(loaded) -> None:  # noqa: ANN001
    from lm_eval.api.instance import Instance

    assert loaded.identity["is_quantized"]
    lm = lm_eval_model(loaded)
    pairs = [("The capital of France is", " Paris"), ("def add(a, b):\n    return", " a + b")]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = [ll for ll, _greedy in lm.loglikelihood(requests)]
    expected = [direct_loglikelihood(loaded.model, loaded.tokenizer, c, x) for c, x in pairs]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_offline_task_through_the_cli_matches_direct_scoring(
    rtn_checkpoint: Path,
    task_dir: Path,
    loaded,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    out = tmp_path / "lm.json"
    args = ["lm-eval", str(rtn_checkpoint), "--tasks", "marlin_tiny_facts", "--include-path", str(task_dir)]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "marlin_tiny_facts" in result.output and "acc" in result.output
    rec = json.loads(out.read_text())
    (acc,) = [m["value"] for m in rec["metrics"] if m["metric"] == "acc"]
    items = [json.loads(line) for line in (TASKS / "tiny_facts.jsonl").read_text().splitlines()]
    correct = 0
    for item in items:
        # lm-eval joins question and choice with its default target delimiter, a space; choices carry theirs.
        scores = [
            direct_loglikelihood(loaded.model, loaded.tokenizer, item["question"], " " + c)
            for c in item["choices"]
        ]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    assert acc == pytest.approx(correct / len(items))
    assert rec["n_samples"]["marlin_tiny_facts"]["effective"] == len(items)
    assert rec["model"]["is_quantized"] and rec["versions"]["lm_eval"] and rec["device"] == "cpu"


def test_unknown_task_is_a_clear_error(task_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["lm-eval", "unused", "--tasks", "no_such_task_xyz", "--include-path", str(task_dir)]
    )
    assert result.exit_code == 2 and "unknown lm-eval task" in result.output.strip().splitlines()[-1]


def test_metric_rows_flatten_results() -> None:
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 8}}}
    assert metric_rows(results) == [
        {"task": "t", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1}
    ]
