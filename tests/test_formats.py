"""The checkpoint-format interface (marlin_cli.formats): a format that reads back codes + scales loads through
the same loader as the Marlin format and gives the same model; a format's ``check`` stops a run before work."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import checkpoint_cache
import pytest
import torch

from gptq import format as fmt
from marlin_cli import formats, loading
from marlin_cli.errors import MarlinError
from marlin_cli.formats import CodesLinear, marlin
from marlin_cli.pipeline.quantize import QuantizeJob, quantize
from marlin_cli.settings import QuantSettings


def codes_format() -> ModuleType:
    """A stand-in format whose reader yields codes + scales (unpacked from a Marlin checkpoint's tensors)."""
    module = ModuleType("codes_format")
    module.NAME = "codes"
    module.recognizes = lambda qc: qc.get("quant_method") == "codes"

    def read(source, qc):  # noqa: ANN001, ANN202
        for item in marlin.read(source, qc):
            shape = fmt.padded_shape(item.in_features, item.out_features, item.group_size)
            codes, scales = fmt.unpack(item.qweight, item.scales, shape)  # [K, N], [G, N]
            k = item.in_features
            g_idx = torch.arange(k) // (k if item.group_size == -1 else item.group_size)
            yield CodesLinear(item.name, codes.T.to(torch.uint8), scales.T.float(), item.group_size, g_idx)

    module.read = read
    return module


@pytest.fixture(scope="module")
def small_rtn(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = checkpoint_cache.shallow_copy(builtin_model_dir, tmp_path_factory.mktemp("src") / "two", 2)
    out = tmp_path_factory.mktemp("ckpt") / "rtn"
    quantize(QuantizeJob(model=str(src), out=out, settings=QuantSettings(group_size=64, nearest=True,
                                                                           format="marlin")), progress=False)
    return out


def test_a_codes_reader_loads_the_same_model_as_the_packed_one(small_rtn: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    packed = loading.load_quantized(small_rtn, dtype=torch.float32)
    other = tmp_path / "codes"
    other.mkdir()
    for f in small_rtn.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "codes"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MarlinError, match="'codes', which this tool cannot load"):
        loading.load_quantized(other)
    monkeypatch.setitem(formats.FORMATS, "codes", codes_format())
    repacked = loading.load_quantized(other, dtype=torch.float32)
    ids = torch.tensor([[1, 42, 7, 300, 5]])
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, repacked(ids).logits)
    layer = repacked.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.qweight, packed.model.layers[0].self_attn.q_proj.qweight)


def test_act_order_codes_load_with_their_permutation(small_rtn: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Columns sorted by a permutation P (as a reader hands act-order layers) give the unpermuted model."""
    packed = loading.load_quantized(small_rtn, dtype=torch.float32)
    module = codes_format()
    plain = module.read
    gen = torch.Generator().manual_seed(0)

    def shuffled(source, qc):  # noqa: ANN001, ANN202
        for item in plain(source, qc):
            k = item.codes.shape[1]
            # Groups shuffled, and columns shuffled within each group: column j (group j // g) is column p[j].
            g = item.group_size
            within = torch.argsort(torch.rand(k // g, g, generator=gen), dim=1).reshape(-1)
            p = torch.randperm(k // g, generator=gen).repeat_interleave(g) * g + within
            groups = p.reshape(-1, g)[:, 0] // g
            yield CodesLinear(item.name, item.codes[:, p], item.scales[:, groups], g, perm=p)

    module.read = shuffled
    monkeypatch.setattr(marlin, "recognizes", lambda qc: False)
    monkeypatch.setitem(formats.FORMATS, "codes", module)
    module.recognizes = lambda qc: True
    model = loading.load_quantized(small_rtn, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.perm is not None
    ids = torch.tensor([[1, 42, 7, 300, 5]])
    with torch.no_grad():
        want, got = packed(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_format_check_stops_the_run_before_any_work(builtin_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    module = ModuleType("picky")
    module.NAME = "picky"
    module.check = lambda shapes, g: [f"{s.name}: {s.in_features} input features" for s in shapes if "k_proj" in s.name]
    monkeypatch.setitem(formats.FORMATS, "picky", module)
    settings = QuantSettings(format="picky", dataset="no-such-corpus")  # the dataset would fail later
    with pytest.raises(MarlinError, match=r"the picky format cannot hold this model: model\.layers\.0\.self_attn"
                                          r"\.k_proj: 576 input features.* \(and 25 more\)"):
        quantize(QuantizeJob(model=str(builtin_model_dir), out=tmp_path / "out", settings=settings), progress=False)
    assert not (tmp_path / "out").exists()
