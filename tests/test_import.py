"""Import: GPTQ and compressed-tensors checkpoints written by *other tools* (built here by independent code,
``serve_checkpoints.py``) load through ``load_model`` and evaluate on the CPU exactly like the dense
dequantized model, with positive scales and with issue 18's signed ones; what cannot be served exactly is a
one-line error with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import serve_checkpoints as sc
import torch
from checkpoint_cache import run_cli, signed_grid
from safetensors.torch import load_file

from marlin_cli.eval.perplexity import stream_perplexity
from marlin_cli.loading import load_model

IDS = torch.tensor([[1, 42, 7, 300, 5, 900, 31, 4000, 17, 2]])


CASES = [
    ("gptq", 64, False, False),
    ("gptq", 64, True, False),
    ("gptq", 32, True, True),
    ("gptq", 64, False, True),
    ("gptq", -1, False, False),
    ("gptq", 192, True, False),  # not a kernel group size: loaded as groups of 64 sharing scales
    ("compressed-tensors", 64, False, False),
    ("compressed-tensors", 32, True, False),
    ("compressed-tensors", -1, False, False),
]


_ABSMAX_RTN = sc.rtn


def signed_rtn(w: torch.Tensor, g: int, order: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``serve_checkpoints.rtn`` with issue 18's signed grid instead of absmax / 7.5 scales: the same groups
    (act-order ``g_idx`` included), each group's larger-magnitude side on code 0, about half the scales < 0."""
    _, _, g_idx = _ABSMAX_RTN(w, g, order)
    by_group = torch.from_numpy(np.argsort(g_idx, kind="stable"))
    codes, scales = signed_grid(w[:, by_group], w.shape[1] if g == -1 else g)
    q = np.empty(tuple(codes.shape), dtype=np.uint32)
    q[:, by_group.numpy()] = codes.numpy()
    return q, scales.numpy().astype(np.float16), g_idx


@pytest.mark.parametrize("scales", ["absmax", "signed"])
@pytest.mark.parametrize(("fmt", "g", "act_order", "zeros_v2"), CASES, ids=lambda v: str(v))
def test_other_tools_checkpoint_equals_the_dense_dequantized_model(
    two_layers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, g: int, act_order: bool,
    zeros_v2: bool, scales: str
) -> None:
    if scales == "signed":
        monkeypatch.setattr(sc, "rtn", signed_rtn)
    dense = sc.write_checkpoint(two_layers, tmp_path / "ckpt", fmt, g, act_order, zeros_v2)
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    written = torch.cat([v.flatten() for k, v in stored.items() if k.endswith(("scales", "weight_scale"))])
    negative = float((written < 0).double().mean())
    assert 0.35 < negative < 0.65 if scales == "signed" else negative == 0, negative
    loaded = load_model(str(tmp_path / "ckpt"), device="cpu", dtype=torch.float32)
    layer = loaded.model.model.layers[1].self_attn.q_proj
    assert type(layer).__name__ == "MarlinLinear" and (layer.perm is not None) == (act_order and g != -1)
    reference = sc.dense_model(two_layers, dense)
    with torch.no_grad():
        got, want = loaded.model(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))
    # and a perplexity through the evaluation code (stream protocol, 2 windows of 64 tokens)
    tokens = torch.arange(1, 130) * 37 % 49000
    ours = stream_perplexity(loaded.model, tokens, 64, max_windows=2, progress=False).ppl
    theirs = stream_perplexity(reference, tokens, 64, max_windows=2, progress=False).ppl
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_a_wrong_zero_version_is_caught(two_layers: Path, tmp_path: Path) -> None:
    """v2 zeros (8) read as v1 (stored zero - 1 = 7) would shift every weight by one step: refused instead."""
    sc.write_checkpoint(two_layers, tmp_path / "ckpt", "gptq", 64, zeros_v2=True)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = config["quantization_config"]
    del qc["format"]
    qc["checkpoint_format"] = "gptq"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    code, output = run_cli("eval-ppl", tmp_path / "ckpt", "--device", "cpu", "--quiet")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "model.layers.0." in output and ": qzeros nibbles are [8]" in output and "gptq_v2" in output, output


def _edit_config(folder: Path, fn) -> None:  # noqa: ANN001
    config = json.loads((folder / "config.json").read_text())
    fn(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _set_weights(**kv):  # noqa: ANN003, ANN202
    def edit(qc: dict) -> None:
        qc["config_groups"]["group_0"]["weights"].update(kv)
    return edit


REFUSALS = [
    ("gptq", lambda qc: qc.update(sym=False), "quantization_config.sym"),
    ("gptq", lambda qc: qc.update(bits=8), "quantization_config.bits"),
    ("compressed-tensors", _set_weights(symmetric=False), "weights.symmetric"),
    ("compressed-tensors", _set_weights(num_bits=8), "weights.num_bits"),
    ("compressed-tensors", _set_weights(type="float", num_bits=8), "weights.type"),  # FP8 weights
    ("compressed-tensors", lambda qc: qc.update(sparsity_config={"format": "sparse-24-bitmask",
                                                                 "sparsity_structure": "2:4"}),
     "quantization_config.sparsity_config"),
]


@pytest.mark.parametrize(("fmt", "edit", "field"), REFUSALS, ids=[r[2] + "-" + r[0] for r in REFUSALS])
def test_unsupported_checkpoints_are_one_line_and_exit_2(two_layers: Path, tmp_path: Path, fmt: str, edit,  # noqa: ANN001
                                                         field: str) -> None:
    sc.write_checkpoint(two_layers, tmp_path / "ckpt", fmt, 64)
    _edit_config(tmp_path / "ckpt", edit)
    code, output = run_cli("eval-ppl", tmp_path / "ckpt", "--device", "cpu", "--quiet")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    assert field in lines[0] and "config.json" in lines[0], output


def test_asymmetric_layer_tensors_are_refused_naming_the_layer(two_layers: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sc.write_checkpoint(two_layers, tmp_path / "ckpt", "compressed-tensors", 64)
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight_zero_point"] = torch.zeros(1536, 9, dtype=torch.int8)
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    code, output = run_cli("eval-ppl", tmp_path / "ckpt", "--device", "cpu", "--quiet")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "model.layers.1.mlp.up_proj: weight_zero_point" in output, output


def test_a_group_size_the_kernel_lacks_is_refused_naming_the_layer(two_layers: Path, tmp_path: Path) -> None:
    sc.write_checkpoint(two_layers, tmp_path / "ckpt", "gptq", 48, act_order=True)
    code, output = run_cli("eval-ppl", tmp_path / "ckpt", "--device", "cpu", "--quiet")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "group size 48" in output and "model.layers.0." in output, output
