"""Calibration and evaluation data on the real built-in corpora, local files and a stand-in hub."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marlin_cli.data import corpora as data
from marlin_cli.data.corpora import calibration_samples, dataset_protocol, eval_documents, eval_stream
from marlin_cli.errors import MarlinError

BOTCHAN_TOKENS = 70191  # SmolLM2 tokens of botchan.txt read in text mode, no BOS: 68 windows of 1024


def _key(ids: torch.Tensor, n: int = 512) -> tuple[int, ...]:
    """Identity of a document: its first ``n`` tokens."""
    return tuple(ids.flatten()[:n].tolist())


# ---------------------------------------------------------------- built-in corpora


def test_protocols() -> None:
    assert dataset_protocol("botchan") == "stream"
    assert dataset_protocol("wikitext2") == "stream"
    assert dataset_protocol("c4") == "stream"
    assert dataset_protocol("pydocs") == "documents"
    assert dataset_protocol("redpajama") == "documents"


def test_botchan_stream_gives_68_windows_without_bos(tokenizer) -> None:
    ids, info = eval_stream(tokenizer, "botchan")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() == BOTCHAN_TOKENS == info.n_tokens
    assert ids.numel() // 1024 == 68
    assert info.protocol == "stream" and info.n_documents is None and len(info.sha256) == 64
    start = tokenizer("\ufeffProject Gutenberg's Botchan", add_special_tokens=False)["input_ids"]
    assert ids[: len(start) - 1].tolist() == start[:-1]  # starts with the text itself: no BOS


def test_botchan_calibration_windows(tokenizer) -> None:
    stream, _ = eval_stream(tokenizer, "botchan")
    windows = calibration_samples(tokenizer, "botchan", 8, 256, seed=3)
    assert len(windows) == 8
    for w in windows:
        assert w.shape == (1, 256) and w.dtype == torch.long
        starts = (stream == w[0, 0]).nonzero().flatten().tolist()
        assert any(torch.equal(stream[s : s + 256], w[0]) for s in starts), (
            "window is not a slice of the text"
        )
    again = calibration_samples(tokenizer, "botchan", 8, 256, seed=3)
    other = calibration_samples(tokenizer, "botchan", 8, 256, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    assert [_key(w) for w in windows] != [_key(w) for w in other]


def test_pydocs_reference_setup(tokenizer) -> None:
    """The reference measurement: 64 calibration docs cut to 512, 64 other held-out docs cut to 1024."""
    calib = calibration_samples(tokenizer, "pydocs", 64, 512, seed=0)
    held, info = eval_documents(tokenizer, "pydocs", 64, 1024, seed=0)
    assert len(calib) == 64 and len(held) == 64 == info.n_documents
    assert all(c.dim() == 2 and c.shape[0] == 1 and 2 <= c.shape[1] <= 512 for c in calib)
    assert all(d.dim() == 1 and 2 <= d.numel() <= 1024 and d.dtype == torch.long for d in held)
    assert any(c.shape[1] == 512 for c in calib) and any(d.numel() == 1024 for d in held)
    assert info.n_tokens == sum(d.numel() for d in held)
    assert not {_key(c) for c in calib} & {_key(d) for d in held}, "calibration and eval share a document"


def test_pydocs_seeds(tokenizer) -> None:
    a = calibration_samples(tokenizer, "pydocs", 16, 128, seed=0)
    b = calibration_samples(tokenizer, "pydocs", 16, 128, seed=0)
    c = calibration_samples(tokenizer, "pydocs", 16, 128, seed=1)
    assert [_key(x) for x in a] == [_key(x) for x in b]
    assert [_key(x) for x in a] != [_key(x) for x in c]
    held0, info0 = eval_documents(tokenizer, "pydocs", 64, 128, seed=0)
    held1, info1 = eval_documents(tokenizer, "pydocs", 64, 128, seed=1)
    assert info0.sha256 != info1.sha256


def test_pydocs_held_out_set_does_not_depend_on_seqlen(tokenizer) -> None:
    short, _ = eval_documents(tokenizer, "pydocs", 64, 64, seed=0)
    long, _ = eval_documents(tokenizer, "pydocs", 64, 2048, seed=0)
    assert [_key(d, 64) for d in short] == [_key(d, 64) for d in long]
    calib = calibration_samples(tokenizer, "pydocs", 64, 2048, seed=0)
    assert not {_key(c, 64) for c in calib} & {_key(d, 64) for d in short}


def test_pydocs_too_many_samples_is_clear(tokenizer) -> None:
    with pytest.raises(MarlinError, match=r"lower --nsamples to \d+"):
        calibration_samples(tokenizer, "pydocs", 10_000, 512, seed=0)


def test_eval_docs_above_reserve_gives_the_reserve(tokenizer) -> None:
    docs, info = eval_documents(tokenizer, "pydocs", 1024, 256, seed=0)
    assert len(docs) == 64 == info.n_documents


def test_wrong_protocol_and_sizes(tokenizer) -> None:
    with pytest.raises(MarlinError, match="stream dataset"):
        eval_documents(tokenizer, "botchan", 4, 128, seed=0)
    with pytest.raises(MarlinError, match="documents dataset"):
        eval_stream(tokenizer, "pydocs")
    with pytest.raises(MarlinError, match="seqlen must be at least 2"):
        calibration_samples(tokenizer, "botchan", 1, 1, seed=0)
    with pytest.raises(MarlinError, match="nsamples must be at least 1"):
        calibration_samples(tokenizer, "botchan", 0, 16, seed=0)


# ---------------------------------------------------------------- bad names and files


@pytest.mark.parametrize("name", ["wikitext", "pile", "botchan.csv"])
def test_unknown_dataset_names_the_choices(name: str) -> None:
    with pytest.raises(MarlinError) as err:
        dataset_protocol(name)
    for choice in ("botchan", "pydocs", "wikitext2", "redpajama", "c4", ".txt", ".jsonl", ".parquet"):
        assert choice in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MarlinError, match="does not exist"):
        dataset_protocol(str(tmp_path / "nothing.jsonl"))


# ---------------------------------------------------------------- local files


def _docs(n: int) -> list[str]:
    """n distinct small documents."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    return [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(5 + i % 40)) for i in range(n)]


def test_local_txt(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    text = "The quick brown fox jumps over the lazy dog.\r\n" * 50
    path.write_bytes(text.encode())
    assert dataset_protocol(str(path)) == "stream"
    ids, info = eval_stream(tokenizer, str(path))
    want = tokenizer(text.replace("\r\n", "\n"), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == want and info.source == str(path) and info.n_tokens == len(want)
    windows = calibration_samples(tokenizer, str(path), 3, 32, seed=0)
    assert [w.shape for w in windows] == [(1, 32)] * 3
    whole = calibration_samples(tokenizer, str(path), 2, 10_000, seed=0)
    assert [w.shape[1] for w in whole] == [len(want)] * 2  # shorter than seqlen: the whole text


def test_local_jsonl_split_is_disjoint_when_a_holdout_is_asked_for(tokenizer, tmp_path: Path) -> None:
    texts = _docs(40)
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    assert dataset_protocol(str(path)) == "documents"
    held, info = eval_documents(tokenizer, str(path), 100, 64, seed=0)
    assert len(held) == 10  # at most a quarter of 40 usable documents are held out for evaluation
    calib = calibration_samples(tokenizer, str(path), 30, 64, seed=0, holdout=10)
    assert not {_key(c) for c in calib} & {_key(d) for d in held}
    everything = {tuple(tokenizer(t)["input_ids"]) for t in texts}
    assert {_key(c) for c in calib} | {_key(d) for d in held} == everything
    with pytest.raises(MarlinError, match="lower --nsamples to 30"):
        calibration_samples(tokenizer, str(path), 31, 64, seed=0, holdout=10)


def test_local_calibration_file_is_used_whole(tokenizer, tmp_path: Path) -> None:
    """Issue 17: a 64-document file with 64 samples asked was refused ("only 48 ... after the 16 held-out")."""
    texts = _docs(64)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    calib = calibration_samples(tokenizer, str(path), 64, 64, seed=0)
    assert {_key(c) for c in calib} == {tuple(tokenizer(t)["input_ids"]) for t in texts}
    with pytest.raises(MarlinError, match="only 64 calibration documents of 2..64 tokens, 65 asked"):
        calibration_samples(tokenizer, str(path), 65, 64, seed=0)
    with pytest.raises(MarlinError, match="only 48 calibration documents .* after the 16 held-out ones"):
        calibration_samples(tokenizer, str(path), 64, 64, seed=0, holdout=16)
    # a named corpus keeps its evaluation hold-out whatever is asked: pydocs' 64 stay out of calibration
    held, _ = eval_documents(tokenizer, "pydocs", 64, 128, seed=0)
    calib = calibration_samples(tokenizer, "pydocs", 16, 128, seed=0, holdout=0)
    assert not {_key(c, 128) for c in calib} & {_key(d, 128) for d in held}


def test_local_json_array_and_parquet_agree(tokenizer, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = _docs(24)
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in texts]))
    pq.write_table(pa.table({"text": texts, "n": list(range(24))}), tmp_path / "c.parquet")
    a = calibration_samples(tokenizer, str(tmp_path / "c.json"), 8, 16, seed=5)
    b = calibration_samples(tokenizer, str(tmp_path / "c.parquet"), 8, 16, seed=5)
    assert all(x.shape[1] <= 16 for x in a)
    assert [_key(x) for x in a] == [_key(x) for x in b]


def test_local_files_without_text_field(tokenizer, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(MarlinError, match="record 1 has no string 'text' field"):
        calibration_samples(tokenizer, str(tmp_path / "a.jsonl"), 1, 16, seed=0)
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(MarlinError, match="b.jsonl:2 is not valid JSON"):
        calibration_samples(tokenizer, str(tmp_path / "b.jsonl"), 1, 16, seed=0)
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    with pytest.raises(MarlinError, match="no 'text' column \\(columns: body\\)"):
        calibration_samples(tokenizer, str(tmp_path / "c.parquet"), 1, 16, seed=0)


# ---------------------------------------------------------------- hub datasets (stand-in for the hub)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace ``datasets.load_dataset`` by small in-memory splits; returns the calls made."""
    datasets = pytest.importorskip("datasets")
    calls: list[dict] = []
    docs = _docs(60)
    long_doc = " ".join(["word"] * 5000)  # more than redpajama's 4096-token limit
    tables = {
        ("wikitext", "test"): ["= Title =", "", "First line of the test split.", "Second line."],
        ("wikitext", "train"): ["Training text " * 30, "more training text " * 30],
        ("togethercomputer/RedPajama-Data-1T-Sample", "train"): [long_doc, "x", *docs],
        ("allenai/c4", "train"): ["short", " ".join(["long"] * 300)],
        ("allenai/c4", "validation"): [f"validation document {i}." for i in range(1200)],
    }

    def load_dataset(path: str, split: str, **kwargs: object) -> object:
        calls.append({"path": path, "split": split, **kwargs})
        return datasets.Dataset.from_dict({"text": tables[(path, split)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_wikitext2(tokenizer, fake_hub: list[dict]) -> None:
    ids, info = eval_stream(tokenizer, "wikitext2")
    want = tokenizer(
        "= Title =\n\n\n\nFirst line of the test split.\n\nSecond line.", add_special_tokens=False
    )
    assert ids.tolist() == want["input_ids"]
    assert info.source == "hub:wikitext[wikitext-2-raw-v1] split=test"
    assert fake_hub[0] == {"path": "wikitext", "split": "test", "name": "wikitext-2-raw-v1"}
    windows = calibration_samples(tokenizer, "wikitext2", 4, 16, seed=0)
    assert fake_hub[1]["split"] == "train" and [w.shape for w in windows] == [(1, 16)] * 4


def test_hub_redpajama_drops_long_documents(tokenizer, fake_hub: list[dict]) -> None:
    held, info = eval_documents(tokenizer, "redpajama", 2000, 4096, seed=0)
    assert len(held) == 60 == info.n_documents  # the 5000-token and 1-token documents are dropped
    assert fake_hub[0] == {"path": "togethercomputer/RedPajama-Data-1T-Sample", "split": "train"}
    short, _ = eval_documents(tokenizer, "redpajama", 2000, 20, seed=0)
    assert 0 < len(short) < 60 and all(d.numel() <= 20 for d in short)  # longer than seqlen: dropped whole
    assert {_key(d) for d in short} <= {_key(d) for d in held}
    with pytest.raises(
        MarlinError,
        match="only 0 calibration documents .* after the 60 held-out ones, 10 asked; use a larger corpus",
    ):
        calibration_samples(tokenizer, "redpajama", 10, 4096, seed=0)  # all 60 usable are held out


def test_hub_c4(tokenizer, fake_hub: list[dict]) -> None:
    ids, info = eval_stream(tokenizer, "c4")
    text = " ".join(f"validation document {i}." for i in range(1100))
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "c4-validation.00000-of-00008.json.gz" in info.source
    windows = calibration_samples(tokenizer, "c4", 3, 64, seed=0)
    assert [w.shape for w in windows] == [(1, 64)] * 3
    assert set(windows[0].flatten().tolist()) == set(
        tokenizer(" long long", add_special_tokens=False)["input_ids"]
    )


def test_hub_unreachable_is_a_clear_error(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MarlinError, match="Without hub access use a built-in dataset"):
        eval_stream(tokenizer, "wikitext2")


def test_hub_offline_mode_through_the_real_loader(builtin_model_dir: Path) -> None:
    """The real ``datasets.load_dataset`` path, with the hub switched off by its own setting."""
    code = (
        "from transformers import AutoTokenizer\n"
        "from marlin_cli.data.corpora import eval_documents\n"
        "from marlin_cli.errors import MarlinError\n"
        f"tok = AutoTokenizer.from_pretrained({str(builtin_model_dir)!r})\n"
        "try:\n    eval_documents(tok, 'redpajama', 4, 128, 0)\n"
        "except MarlinError as err:\n    print('MarlinError:', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "MarlinError: could not load hub:togethercomputer/RedPajama-Data-1T-Sample" in out.stdout, (
        out.stderr
    )


def test_hub_dataset_offline_fails_at_once(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: with no route to the Hub a hub name failed only after ~30 s of retries; now at once."""
    pytest.importorskip("datasets")
    if data.hub_unreachable() is None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a machine with network: switch it off the documented way
    assert data.hub_unreachable() is not None
    for name in ("wikitext2", "redpajama", "c4"):
        start = time.perf_counter()
        with pytest.raises(MarlinError, match="cannot be reached .* Without hub access use a built-in dataset"):
            calibration_samples(tokenizer, name, 4, 64, seed=0)
        assert time.perf_counter() - start < 15, f"{name}: the offline error took too long"


def test_hub_check_reads_the_offline_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert data.hub_unreachable() == f"{var} is set"
        monkeypatch.delenv(var)


def test_declarations_are_complete() -> None:
    decl = data._declarations()
    for name, fields in decl["datasets"].items():
        assert fields["protocol"] in ("stream", "documents"), name
        if fields["protocol"] == "documents":
            assert fields["long_documents"] in ("drop", "truncate") and fields["eval_reserve"] > 0, name
    assert decl["datasets"]["redpajama"]["eval_reserve"] == 1024
    assert decl["datasets"]["pydocs"]["eval_reserve"] == 64
