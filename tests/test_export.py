"""Export: ``marlin quantize`` / ``marlin export`` write compressed-tensors and GPTQ checkpoints that the clients'
own code reads as the weights we meant, and the three formats convert into each other code for code, with
positive scales and with issue 18's signed scales (about half negative).

Oracles: transformers' compressed-tensors integration (the ``compressed-tensors`` library decompresses our
export), AutoGPTQ's dequantization formula written out here, our native Marlin checkpoint, and for the signed
scales the grid computed here (:func:`checkpoint_cache.signed_grid`)."""

from __future__ import annotations

import json
from pathlib import Path

import checkpoint_cache
import pytest
import test_quantize
import torch
from checkpoint_cache import run_cli, signed_grid
from safetensors.torch import load_file, save_file

from gptq import format as fmt
from marlin_cli.errors import MarlinError
from marlin_cli.eval.ppl import measure
from marlin_cli.loading import load_model
from marlin_cli.pipeline.pack import codes_from_grid

IDS = torch.tensor([[1, 42, 7, 300, 5, 900, 31, 4000, 17, 2]])
SOURCES = ["quantize-rtn", "pack-signed"]
"""Where the chain's first Marlin checkpoint comes from: ``marlin quantize --nearest``, or ``marlin pack`` of
the model fake-quantized on issue 18's signed grid (about half of the scales negative)."""


@pytest.fixture(scope="module")
def signed_pack(two_layers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``marlin pack --format marlin`` (g64) of the 2-layer model with every decoder linear fake-quantized on
    :func:`checkpoint_cache.signed_grid` (test_quantize's fake-quantizer with the signed grid swapped in)."""
    root = tmp_path_factory.mktemp("signed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_quantize, "independent_rtn", signed_grid)
        fake, scales = test_quantize.make_fake_quantized(two_layers, root / "fake", 64)
    code, output = run_cli("pack", fake, "--scales", scales, "--group-size", "64", "--format", "marlin",
                           "--out", root / "marlin")
    assert code == 0, output
    return root / "marlin"


@pytest.fixture(scope="module", params=SOURCES)
def exports(request: pytest.FixtureRequest, two_layers: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    """A native Marlin g64 checkpoint of the 2-layer model (see :data:`SOURCES`), exported
    marlin -> ct -> gptq -> marlin."""
    root = tmp_path_factory.mktemp("exports")
    if request.param == "pack-signed":
        folders = {"marlin": request.getfixturevalue("signed_pack")}
    else:
        folders = {"marlin": root / "marlin"}
        code, output = run_cli("quantize", two_layers, "--out", root / "marlin", "--nearest", "--group-size", "64",
                               "--format", "marlin", "--quiet")
        assert code == 0, output
    chain = [("marlin", "ct", "compressed-tensors"), ("ct", "gptq", "gptq"), ("gptq", "marlin2", "marlin")]
    for src, dst, name in chain:
        folders[dst] = root / dst
        code, output = run_cli("export", folders[src], "--format", name, "--out", folders[dst])
        assert code == 0, output
        assert "vLLM's Marlin shape rule" in output or name == "marlin", output  # K = 576: warned, not refused
    return folders


def marlin_dense(folder: Path) -> dict[str, torch.Tensor]:
    """Layer name -> W [N, K] float32 from a Marlin checkpoint's packed tensors (our format's own definition)."""
    tensors = load_file(folder / "model.safetensors")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    out = {}
    for name in qc["modules"]:
        k, n = (int(v) for v in tensors[f"{name}.shape"])
        b = fmt.dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], qc["group_size"])
        out[name] = b[:k, :n].T.contiguous()
    return out


def test_pack_keeps_signed_scales_exactly(signed_pack: Path, two_layers: Path) -> None:
    """The signed grid through ``marlin pack``: every Marlin weight is exactly (q - 8) * s of the grid computed
    here from the source weights, and about half of the scales are negative (so the chain tests see them)."""
    source = load_file(two_layers / "model.safetensors")
    negative = total = 0
    for name, w in marlin_dense(signed_pack).items():
        codes, s = signed_grid(source[f"{name}.weight"], 64)
        assert torch.equal(w.double(), (codes.double() - 8) * s.repeat_interleave(64, dim=1)), name
        negative, total = negative + int((s < 0).sum()), total + s.numel()
    assert 0.35 < negative / total < 0.65, (negative, total)


def test_pack_takes_negative_scales_and_refuses_weights_off_their_grid() -> None:
    s = torch.tensor([[-0.5, 0.25], [0.0, -1.0]], dtype=torch.float16)  # N = 2, K = 8, g = 4
    codes = torch.tensor([[0, 3, 8, 15, 0, 15, 8, 1], [8, 8, 8, 8, 0, 7, 15, 8]])
    w = ((codes - 8) * s.float().repeat_interleave(4, dim=1)).half()
    assert w[0, 0] == 4 and w[1, 4] == 8  # a positive extreme on code 0 where the scale is negative
    got = codes_from_grid("L", w, s, 4)
    assert torch.equal(got.codes, codes.to(torch.uint8)) and torch.equal(got.scales, s.float())

    def changed(r: int, c: int, value: float) -> torch.Tensor:
        out = w.float().clone()
        out[r, c] = value
        return out

    with pytest.raises(MarlinError, match=r"L: weight \[0, 1\] = -4 needs code 16, outside 0..15 for scale -0.5"):
        codes_from_grid("L", changed(0, 1, -4.0), s, 4)  # -4 = 8 * s: one level past 7 * s
    with pytest.raises(MarlinError, match=r"L: weight \[0, 2\] = 0.2 is 0.4 grid steps off"):
        codes_from_grid("L", changed(0, 2, 0.2), s, 4)
    with pytest.raises(MarlinError, match=r"L: weight \[1, 0\] = 1 is inf grid steps off .* scale 0;"):
        codes_from_grid("L", changed(1, 0, 1.0), s, 4)


def test_export_chain_gives_bit_identical_marlin_tensors(exports: dict[str, Path]) -> None:
    first, last = load_file(exports["marlin"] / "model.safetensors"), load_file(exports["marlin2"] / "model.safetensors")
    assert first.keys() == last.keys()
    for key in first:
        assert first[key].dtype == last[key].dtype and torch.equal(first[key], last[key]), key
    ct_qc = json.loads((exports["ct"] / "config.json").read_text())["quantization_config"]
    assert (ct_qc["quant_method"], ct_qc["format"], ct_qc["ignore"]) == ("compressed-tensors", "pack-quantized",
                                                                         ["lm_head"])
    gptq_qc = json.loads((exports["gptq"] / "config.json").read_text())["quantization_config"]
    assert (gptq_qc["quant_method"], gptq_qc["checkpoint_format"], gptq_qc["sym"], gptq_qc["desc_act"]) == (
        "gptq", "gptq", True, False)


def test_every_format_loads_to_the_same_logits(exports: dict[str, Path]) -> None:
    logits = {}
    for name in ("marlin", "ct", "gptq"):
        model = load_model(str(exports[name]), device="cpu", dtype=torch.float32).model
        with torch.no_grad():
            logits[name] = model(IDS).logits
    assert torch.equal(logits["marlin"], logits["ct"]) and torch.equal(logits["marlin"], logits["gptq"])


def test_gptq_export_dequantizes_by_autogptqs_formula(exports: dict[str, Path]) -> None:
    """AutoGPTQ's torch forward, written out: W^T = (unpack(qweight) - (unpack(qzeros) + 1)) * scales[g_idx]."""
    tensors = load_file(exports["gptq"] / "model.safetensors")
    ct = load_file(exports["ct"] / "model.safetensors")
    want = marlin_dense(exports["marlin"])
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    for name, w in want.items():
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"].long()
        weight = torch.bitwise_and(torch.bitwise_right_shift(qweight.unsqueeze(1), shifts.view(1, -1, 1)), 15)
        weight = weight.reshape(-1, qweight.shape[1])  # [K, N]
        zeros = torch.bitwise_and(torch.bitwise_right_shift(qzeros.unsqueeze(2), shifts.view(1, 1, -1)), 15)
        zeros = zeros.reshape(qzeros.shape[0], -1) + 1  # v1: stored zero - 1
        dense = (weight - zeros[g_idx]).float() * scales.float()[g_idx]
        assert torch.equal(dense.T, w), name
        assert torch.equal(qweight, ct[f"{name}.weight_packed"].T), name  # the cross-check


def _transformers_model(folder: Path) -> torch.nn.Module:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_transformers_decompresses_our_export_exactly(exports: dict[str, Path]) -> None:
    """The compressed-tensors library (through transformers) gets (q - 8) * s for every quantized weight, and
    the logits of our loader."""
    model = _transformers_model(exports["ct"])
    ours = load_model(str(exports["ct"]), device="cpu", dtype=torch.float32).model
    with torch.no_grad():  # transformers 5 decompresses at the first forward
        want, got = ours(IDS).logits, model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    for name, w in marlin_dense(exports["marlin"]).items():
        assert torch.equal(model.get_submodule(name).weight.float(), w), name


def test_reversed_nibbles_fail_the_library_check(exports: dict[str, Path], tmp_path: Path) -> None:
    """Negative control: the same export with the 8 nibbles of every word in reverse order decompresses to
    other weights, so the check above can fail."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in exports["ct"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        nib = (tensors[key].to(torch.int64).unsqueeze(-1) >> shifts) & 15
        words = (nib.flip(-1) << shifts).sum(-1)
        tensors[key] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    model = _transformers_model(bad)
    with torch.no_grad():
        model(IDS[:, :2])  # decompress
    name, w = next(iter(marlin_dense(exports["marlin"]).items()))
    assert not torch.equal(model.get_submodule(name).weight.float(), w)


def test_quantize_writes_compressed_tensors_by_default_and_refuses_what_it_cannot_hold(
    two_layers: Path, tmp_path: Path
) -> None:
    code, output = run_cli("quantize", two_layers, "--out", tmp_path / "g128", "--nearest", "--quiet")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output  # default g128: K = 576 does not divide, said before any work
    assert "compressed-tensors format cannot hold" in lines[0] and "model.layers.0.self_attn.q_proj" in lines[0]
    assert "--group-size 32 or 64 or -1" in lines[0] and "--format marlin" in lines[0], output
    assert not (tmp_path / "g128").exists()
    code, output = run_cli("quantize", two_layers, "--out", tmp_path / "gptq", "--nearest", "--group-size", "128",
                           "--format", "gptq", "--quiet")
    assert code == 2 and "gptq format cannot hold" in output and not (tmp_path / "gptq").exists()
    for name in ("compressed-tensors", "gptq"):
        code, output = run_cli("quantize", two_layers, "--out", tmp_path / "skip", "--nearest", "--group-size", "64",
                               "--format", name, "--skip-gq", "--quiet")
        assert code == 2 and "--skip-gq" in output and "--format marlin" in output, output
    code, output = run_cli("quantize", two_layers, "--out", tmp_path / "ct", "--nearest", "--group-size", "64",
                           "--quiet")
    assert code == 0, output
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_export_of_a_skip_gq_checkpoint_refuses_mixed_fused_layers(two_layers: Path, tmp_path: Path) -> None:
    code, output = run_cli("quantize", two_layers, "--out", tmp_path / "skip", "--nearest", "--group-size", "64",
                           "--format", "marlin", "--skip-gq", "--quiet")
    assert code == 0, output
    code, output = run_cli("export", tmp_path / "skip", "--format", "gptq", "--out", tmp_path / "gptq")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "self_attn.k_proj" in output and "q_proj/k_proj/v_proj" in output and not (tmp_path / "gptq").exists()
    code, output = run_cli("export", two_layers, "--format", "gptq", "--out", tmp_path / "x")
    assert code == 2 and "is not quantized" in output, output


@pytest.mark.slow
def test_builtin_model_round_trip_through_transformers_gives_our_perplexity(
    builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, tokenizer
) -> None:
    """quantize (g64) -> compressed-tensors -> transformers' own loader -> perplexity == our native path's."""
    native = checkpoint_cache.rtn_checkpoint(tmp_path_factory, builtin_model_dir)
    ct = tmp_path_factory.mktemp("rt") / "ct"
    code, output = run_cli("export", native, "--format", "compressed-tensors", "--out", ct)
    assert code == 0, output
    ours = load_model(str(native), device="cpu", dtype=torch.float32).model
    want, _ = measure(ours, tokenizer, "botchan", 128, max_windows=2, progress=False)
    del ours
    theirs = _transformers_model(ct)
    got, _ = measure(theirs, tokenizer, "botchan", 128, max_windows=2, progress=False)
    assert got.tokens_scored == want.tokens_scored
    assert got.ppl == pytest.approx(want.ppl, rel=1e-4), (got.ppl, want.ppl)
    code, output = run_cli("eval-ppl", ct, "--dataset", "botchan", "--seqlen", "128", "--max-windows", "2",
                           "--device", "cpu", "--quiet", "--json", ct.parent / "ppl.json")
    assert code == 0, output
    assert json.loads((ct.parent / "ppl.json").read_text())["ppl"] == pytest.approx(want.ppl, rel=1e-6)


def test_pack_writes_each_format_with_the_same_codes(two_layers: Path, tmp_path: Path) -> None:
    from test_quantize import make_fake_quantized

    fake, scales = make_fake_quantized(two_layers, tmp_path / "fake", 64)
    for name in ("marlin", "gptq", "compressed-tensors"):
        code, output = run_cli("pack", fake, "--scales", scales, "--group-size", "64", "--format", name,
                               "--out", tmp_path / name)
        assert code == 0, output
    for name in ("gptq", "compressed-tensors"):
        code, output = run_cli("export", tmp_path / name, "--format", "marlin", "--out", tmp_path / f"{name}-m")
        assert code == 0, output
        packed, back = load_file(tmp_path / "marlin" / "model.safetensors"), load_file(tmp_path / f"{name}-m" /
                                                                                       "model.safetensors")
        assert packed.keys() == back.keys() and all(torch.equal(packed[k], back[k]) for k in packed), name
