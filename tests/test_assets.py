"""The cached built-in assets: what was fetched, the GGUF conversion, the cache API and the command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from marlin_cli.data import assets as assets_mod
from marlin_cli.data.assets import Assets, ensure_assets, sha256_file
from marlin_cli.errors import MarlinError


def test_cache_record_matches_files(assets: Assets) -> None:
    root = assets.model_dir.parents[1]
    record = json.loads((root / "assets.json").read_text())
    assert record["gguf"]["sha256"] == sha256_file(assets.gguf_path) == assets_mod._GGUF.sha256
    assert record["botchan"]["sha256"] == sha256_file(assets.botchan_path) == assets_mod._BOTCHAN.sha256
    assert record["gguf"]["version"] == "0.1.2" and record["botchan"]["version"] == "0.2.0"
    docs = sorted(assets.pydocs_dir.rglob("*.rst.txt"))
    assert len(docs) == record["pydocs"]["n_files"] == 497
    assert (assets.pydocs_dir / "library" / "functions.rst.txt").is_file()
    assert record["pydocs"]["package"] == "python3.11-doc"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (assets.model_dir / name).is_file(), name


def test_ensure_assets_is_fast_and_quiet_when_cached(assets: Assets) -> None:
    messages: list[str] = []
    start = time.perf_counter()
    again = ensure_assets(assets.model_dir.parents[1], log=messages.append)
    assert time.perf_counter() - start < 1.0
    assert again == assets and messages == []


def test_missing_cache_says_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARLIN_CACHE", str(tmp_path / "empty"))
    for getter in (assets_mod.builtin_model_dir, assets_mod.botchan_path, assets_mod.pydocs_dir):
        with pytest.raises(MarlinError, match="run `marlin fetch-assets` first"):
            getter()
    assert assets_mod.cache_root() == tmp_path / "empty"


def test_accessors_follow_marlin_cache(assets: Assets, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARLIN_CACHE", str(assets.model_dir.parents[1]))
    assert assets_mod.builtin_model_dir() == assets.model_dir
    assert assets_mod.botchan_path() == assets.botchan_path
    assert assets_mod.pydocs_dir() == assets.pydocs_dir
    assert assets_mod.builtin_gguf_path() == assets.gguf_path


def test_fetch_assets_command(assets: Assets) -> None:
    from marlin_cli.cli import main

    result = CliRunner().invoke(main, ["fetch-assets", "--cache-dir", str(assets.model_dir.parents[1])])
    assert result.exit_code == 0, result.output
    assert str(assets.model_dir) in result.output and str(assets.pydocs_dir) in result.output


def test_saved_config_is_plain_llama(builtin_model_dir: Path) -> None:
    config = json.loads((builtin_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "float16"
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (
        9,
        3,
        49152,
    )


@pytest.fixture(scope="module")
def gguf_and_saved(assets: Assets) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(GGUF model dequantized to float32, converted folder loaded in float32)."""
    from transformers import AutoModelForCausalLM

    folder, name = str(assets.gguf_path.parent), assets.gguf_path.name
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    return gguf, saved


def test_saved_weights_are_the_gguf_weights_in_float16(gguf_and_saved, assets: Assets) -> None:
    from safetensors import safe_open

    gguf, saved = gguf_and_saved
    with safe_open(assets.model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    want = gguf.state_dict()
    got = saved.state_dict()
    assert set(got) == set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key].to(torch.float16).to(torch.float32)), key


def test_converted_logits_equal_gguf_logits(gguf_and_saved, tokenizer, assets: Assets) -> None:
    gguf, saved = gguf_and_saved
    text = assets.botchan_path.read_text(encoding="utf-8")[5000:7000]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:64]])
    with torch.no_grad():
        exact = gguf(ids).logits
        got = saved(ids).logits
        for param in gguf.parameters():  # round the GGUF weights to float16 in place (idempotent, so the
            param.copy_(param.to(torch.float16).to(torch.float32))  # other test of this fixture still holds)
        want = gguf(ids).logits
    # Same float16 weights, both in float32: equal up to summation order.
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()  # measured: 0
    # Against the unrounded GGUF (its Q4_1/Q8_0 values are not all float16): small, same predictions.
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 2e-3, rel  # measured: 6e-4
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.95  # measured: all 64
