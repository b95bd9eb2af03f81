"""GPTQ export/import, checked against independent oracles written here from the published formats.

Oracles: AutoGPTQ's torch dequantization formula (qlinear_cuda.py: unpack ``qweight``/``qzeros`` nibbles with
shifts 0, 4, ..., 28, add 1 to v1 zeros, ``W^T = scales[g_idx] * (q - zeros[g_idx])``), a loop packer in the
style of AutoGPTQ's ``pack``, and the compressed-tensors export (``qweight == weight_packed^T``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoint_cache import signed_grid_random

from marlin_cli import loading
from marlin_cli.errors import MarlinError
from marlin_cli.formats import compressed_tensors as ct
from marlin_cli.formats import gptq

SHAPES = [(1536, 576), (576, 1536), (64, 256)]  # (N, K): built-in model's MLP shapes and a small one
GROUPS = [32, 64, 128, -1]
ZERO_FORMATS = ["v1", "v2"]
DATA = ["random-sign", "signed-grid"]
"""Test data: uniform codes with scales of random sign, or issue 18's signed grid of a random weight (each
group's larger-magnitude side on code 0, so the scale is negative where that side is positive)."""


def _random(n: int, k: int, g: int, seed: int, data: str = "random-sign") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 [N, K] and fp16 scales [N, G] (some negative)."""
    if data == "signed-grid":
        codes, scales = signed_grid_random(n, k, g, seed)
        return codes, scales.half()
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g == -1 else k // g
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half()
    return codes, torch.where(torch.rand(n, groups, generator=gen) < 0.3, -scales, scales)


def _dense(codes: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W [N, K] = (q - 8) * s[:, g_idx] in float64: the definition."""
    return (codes.double() - 8) * scales.double()[:, g_idx.long()]


def _autogptq_dequant(t: dict[str, torch.Tensor], v1: bool) -> torch.Tensor:
    """AutoGPTQ's published torch path (bits = 4), in float64; returns W [N, K]."""
    wf = torch.arange(0, 32, 4, dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(t["qzeros"].unsqueeze(2).expand(-1, -1, 8), wf.unsqueeze(0)) & 15
    zeros = zeros.reshape(t["scales"].shape).long()
    if v1:
        zeros = zeros + 1
    weight = torch.bitwise_right_shift(t["qweight"].unsqueeze(1).expand(-1, 8, -1), wf.unsqueeze(-1)) & 15
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2]).long()
    gi = t["g_idx"].long()
    w_t = t["scales"].double()[gi] * (weight - zeros[gi]).double()  # [K, N]
    return w_t.T


def _loop_pack_rows(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ-style packer: 8 consecutive rows into one uint32 row, value j - i at bits 4 (j - i)."""
    out = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    for row in range(out.shape[0]):
        for j in range(8):
            out[row] |= intweight[8 * row + j].astype(np.uint32) << np.uint32(4 * j)
    return out.astype(np.int32)


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("zero_format", ZERO_FORMATS)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_autogptq_formula_gives_definition(n: int, k: int, g: int, zero_format: str, data: str) -> None:
    if g != -1 and k % g:
        pytest.skip("K not a multiple of g")
    codes, scales = _random(n, k, g, seed=n + k + g, data=data)
    assert (scales < 0).any() and (scales > 0).any()
    t = gptq.encode_tensors(codes, scales, g, zero_format=zero_format)
    groups = scales.shape[1]
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (k // 8, n)
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (groups, n)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (groups, n // 8)
    assert t["g_idx"].dtype == torch.int32 and tuple(t["g_idx"].shape) == (k,)
    g_idx = torch.zeros(k, dtype=torch.int64) if g == -1 else torch.arange(k) // g
    assert torch.equal(t["g_idx"].long(), g_idx)
    assert torch.equal(_autogptq_dequant(t, v1=zero_format == "v1"), _dense(codes, scales, g_idx))
    # The packer matches an AutoGPTQ-style loop packer bit for bit.
    assert torch.equal(t["qweight"], torch.from_numpy(_loop_pack_rows(codes.T.numpy())))


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("g", GROUPS)
def test_v1_v2_confusion_is_caught(g: int, data: str) -> None:
    n, k = 1536, 576
    if g != -1 and k % g:
        g = 64
    codes, scales = _random(n, k, g, seed=41, data=data)
    g_idx = torch.zeros(k, dtype=torch.int64) if g == -1 else torch.arange(k) // g
    v1, v2 = gptq.encode_tensors(codes, scales, g, "v1"), gptq.encode_tensors(codes, scales, g, "v2")
    assert torch.equal(v1["qweight"], v2["qweight"]) and torch.equal(v1["scales"], v2["scales"])
    assert (v1["qzeros"] == 0x77777777).all() and (v2["qzeros"].view(torch.uint32) == 0x88888888).all()
    # Reading with the wrong convention gives a wrong weight (the oracle is sensitive to the offset) ...
    assert not torch.equal(_autogptq_dequant(v2, v1=True), _dense(codes, scales, g_idx))
    assert not torch.equal(_autogptq_dequant(v1, v1=False), _dense(codes, scales, g_idx))
    # ... and our decoder refuses it, naming the layer and the likely cause.
    with pytest.raises(MarlinError, match=r"^model.layers.3.mlp.down_proj: qzeros .*looks like gptq_v2"):
        gptq.decode_tensors(v2, g, "v1", name="model.layers.3.mlp.down_proj")
    with pytest.raises(MarlinError, match=r"looks like gptq\b"):
        gptq.decode_tensors(v1, g, "v2", name="L")
    for zf, t in (("v1", v1), ("v2", v2)):
        c, s, perm = gptq.decode_tensors(t, g, zf)
        assert perm is None and torch.equal(c, codes) and torch.equal(s, scales)


class _Tensors(dict):
    """A :class:`marlin_cli.formats.TensorSource` over a dict of tensors (a checkpoint without files)."""

    def names(self) -> list[str]:
        return list(self)


@pytest.mark.parametrize("zero_format", ZERO_FORMATS)
@pytest.mark.parametrize("g", [32, 64, 192, -1])
def test_our_loader_reads_signed_scales_exactly(g: int, zero_format: str) -> None:
    """A GPTQ layer with issue 18's signed scales, read by the format's ``read`` and built by the loader into
    the layer it serves: its weight is exactly what AutoGPTQ's formula gives, and its CPU product agrees with
    the float64 one (g = 192 is loaded as groups of 64 sharing scales)."""
    n, k = 576, 1536
    codes, scales = _random(n, k, g, seed=67 + g, data="signed-grid")
    t = gptq.encode_tensors(codes, scales, g, zero_format=zero_format)
    want = _autogptq_dequant(t, v1=zero_format == "v1")  # W [N, K], float64
    assert (scales < 0).any() and torch.equal(want, _dense(codes, scales, t["g_idx"]))
    source = _Tensors({f"model.layers.0.mlp.up_proj.{key}": v for key, v in t.items()})
    (item,) = list(gptq.read(source, gptq.build_config(g, zero_format=zero_format)))
    layer = loading._quantized_linear(item, None, "cpu").float()
    assert torch.equal(layer.dense_weight(torch.float64, torch.device("cpu"))[:k, :n].T, want)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(71), dtype=torch.float64)
    with torch.no_grad():
        got = layer(x.float()).double()
    torch.testing.assert_close(got, x @ want.T, rtol=1e-5, atol=1e-5 * float((x @ want.T).abs().max()))


@pytest.mark.parametrize("g", [32, 64, -1])
def test_qweight_is_weight_packed_transposed(g: int) -> None:
    """Same nibble order as compressed-tensors, K vs N transposed (what vLLM's repack relies on)."""
    n, k = 1536, 576
    codes, scales = _random(n, k, g, seed=43)
    t = gptq.encode_tensors(codes, scales, g)
    c = ct.encode_tensors(codes, scales, g, dtype=torch.float16)
    assert torch.equal(t["qweight"], c["weight_packed"].T)
    assert torch.equal(t["scales"], c["weight_scale"].T)


def test_act_order_checkpoint_from_independent_code() -> None:
    """A desc_act layer built here (random quantization order, g_idx from it, loop packer) decodes to a
    sorted weight whose product with the gathered activations is the dense product."""
    n, k, g = 1536, 576, 64
    groups = k // g
    gen = torch.Generator().manual_seed(47)
    order = torch.randperm(k, generator=gen)  # GPTQ quantizes column order[i] i-th
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // g
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(groups, n, generator=gen) * 0.05 + 1e-3).half()  # [G, N] as stored
    qzeros = _loop_pack_rows(np.full((n, groups), 7, dtype=np.uint32)).T  # [G, N/8] of 0x77777777
    tensors = {"qweight": torch.from_numpy(_loop_pack_rows(q.T.numpy())), "scales": s,
               "qzeros": torch.from_numpy(np.ascontiguousarray(qzeros)), "g_idx": g_idx.to(torch.int32)}
    w = _dense(q, s.T, g_idx)
    torch.testing.assert_close(_autogptq_dequant(tensors, v1=True), w, rtol=0, atol=0)

    codes_s, scales_s, perm = gptq.decode_tensors(tensors, g, "v1", name="L")
    assert perm is not None and perm.dtype == torch.int64
    assert torch.equal(torch.sort(perm).values, torch.arange(k))
    assert torch.equal(g_idx[perm], torch.arange(k) // g)  # sorted g_idx is monotone
    x = torch.randn(7, k, generator=gen, dtype=torch.float64)
    y = x[:, perm] @ _dense(codes_s, scales_s, torch.arange(k) // g).T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-12, atol=1e-12)
    # Without the gather the result is wrong (the test can fail).
    assert not torch.allclose(x @ _dense(codes_s, scales_s, torch.arange(k) // g).T, x @ w.T)


def test_asymmetric_zeros_are_refused() -> None:
    codes, scales = _random(64, 256, 32, seed=53)
    t = gptq.encode_tensors(codes, scales, 32)
    qz = t["qzeros"].clone()
    qz[2, 1] = 0x77777677  # one zero point of 6 instead of 7
    with pytest.raises(MarlinError, match=r"^model.layers.0.self_attn.q_proj: qzeros .*asymmetric"):
        gptq.decode_tensors(dict(t, qzeros=qz), 32, "v1", name="model.layers.0.self_attn.q_proj")
    with pytest.raises(MarlinError, match="^L: sym is false"):
        gptq.decode_tensors(t, 32, "v1", sym=False, name="L")
    with pytest.raises(MarlinError, match="L: scales has 8 groups, expected 4"):
        gptq.decode_tensors(t, 64, "v1", name="L")
    with pytest.raises(MarlinError, match="L: K = 256 is not a multiple of the group size 96"):
        gptq.decode_tensors(t, 96, "v1", name="L")
    with pytest.raises(MarlinError, match="L: qweight missing"):
        gptq.decode_tensors({"scales": t["scales"], "qzeros": t["qzeros"]}, 32, name="L")
    bad = t["g_idx"].clone()
    bad[:40] = 0
    with pytest.raises(MarlinError, match="L: g_idx"):
        gptq.decode_tensors(dict(t, g_idx=bad), 32, name="L")
    # An old checkpoint without g_idx decodes with arange(K) // g.
    c, s, perm = gptq.decode_tensors({k: v for k, v in t.items() if k != "g_idx"}, 32, name="L")
    assert perm is None and torch.equal(c, codes)


def test_config_is_autogptq_layout() -> None:
    """AutoGPTQ's BaseQuantizeConfig.to_dict (fields and order) for these settings, plus GPTQModel's lm_head."""
    expected = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
                "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
                "quant_method": "gptq", "checkpoint_format": "gptq", "lm_head": False}
    ours = gptq.build_config(128)
    assert ours == expected and list(ours) == list(expected)
    assert gptq.build_config(64, zero_format="v2")["checkpoint_format"] == "gptq_v2"
    for g, desc, zf in [(128, False, "v1"), (64, True, "v2"), (-1, False, "v1"), (-1, True, "v1")]:
        s = gptq.parse_config(gptq.build_config(g, desc_act=desc, zero_format=zf), "c")
        assert (s.bits, s.group_size, s.sym, s.zero_format) == (4, g, True, zf)
        assert s.desc_act == (desc and g != -1)  # per channel, act-order is a no-op (as in vLLM)


def test_config_loads_in_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTQConfig.from_dict(gptq.build_config(64, desc_act=True))
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == (4, 64, True, True)


def test_parse_config_gptqmodel_style() -> None:
    """GPTQModel's newer layout: ``format`` / ``method`` plus ``meta``; unknown keys are ignored."""
    qc = {"bits": 4, "group_size": 32, "desc_act": True, "sym": True, "lm_head": False, "method": "gptq",
          "quant_method": "gptq", "format": "gptq_v2", "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
          "meta": {"quantizer": ["gptqmodel:5.0.0"], "damp_percent": 0.05}}
    s = gptq.parse_config(qc, "c")
    assert (s.group_size, s.desc_act, s.zero_format) == (32, True, "v2")
    assert gptq.parse_config({"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                              "quant_method": "gptq"}, "c").zero_format == "v1"


@pytest.mark.parametrize("change,field", [
    ({"bits": 8}, "bits"),
    ({"bits": 3}, "bits"),
    ({"sym": False}, "sym"),
    ({"quant_method": "awq"}, "quant_method"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"checkpoint_format": "gptq_p"}, "checkpoint_format"),
    ({"is_marlin_format": True}, "is_marlin_format"),
    ({"group_size": 0}, "group_size"),
    ({"desc_act": "yes"}, "desc_act"),
    ({"lm_head": True}, "lm_head"),
    ({"dynamic": {"-:.*mlp.*": {}}}, "dynamic"),
])
def test_parse_config_refuses(change: dict, field: str) -> None:
    qc = dict(gptq.build_config(128), **change)
    with pytest.raises(MarlinError) as err:
        gptq.parse_config(qc, "ckpt/config.json")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("ckpt/config.json: quantization_config.") and field in msg


def test_which_layers_fail() -> None:
    shapes = {"q_proj": (576, 576), "down_proj": (1536, 576), "odd_n": (576, 100), "odd_k": (100, 64)}
    assert gptq.which_layers_fail(shapes, 64) == [
        "odd_n: N = 100 is not a multiple of 8 (qzeros packs 8 columns per int32)",
        "odd_k: K = 100 is not a multiple of 8 (qweight packs 8 rows per int32)",
    ]
    fails = gptq.which_layers_fail({"q_proj": (576, 576), "down_proj": (1536, 576)}, 128)
    assert fails == ["q_proj: K = 576 is not a multiple of the group size 128"]
    assert gptq.which_layers_fail({"q_proj": (576, 576)}, -1) == []


def test_encode_refuses_unwritable() -> None:
    codes, scales = _random(60, 64, 32, seed=1)
    with pytest.raises(ValueError, match="N = 60"):
        gptq.encode_tensors(codes, scales, 32)
    with pytest.raises(ValueError, match="zero_format"):
        gptq.encode_tensors(codes, scales, 32, zero_format="v3")  # type: ignore[arg-type]


@pytest.mark.parametrize("g,zero_format,desc_act", [(64, "v1", False), (64, "v2", False), (-1, "v1", False),
                                                    (32, "v1", True)])
def test_gptqmodel_torch_kernel_dequantizes_our_export(g: int, zero_format: str, desc_act: bool) -> None:
    """GPTQModel's own torch backend as the oracle (only where gptqmodel is installed: it needs torch >= 2.14.1,
    so not in the project venv; it passed in a throwaway venv with GPTQModel 7.7.0)."""
    qlinear = pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    n, k = 1536, 576
    codes, scales = _random(n, k, g, seed=59)
    t = gptq.encode_tensors(codes, scales, g, zero_format=zero_format)
    g_idx = t["g_idx"].long()
    if desc_act:
        gen = torch.Generator().manual_seed(61)
        order = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[order] = torch.arange(k) // g
        codes = codes[:, torch.argsort(torch.argsort(g_idx, stable=True))]  # column c gets sorted slot's codes
        t = dict(gptq.encode_tensors(codes, scales, g, zero_format=zero_format), g_idx=g_idx.to(torch.int32))
    lin = qlinear.TorchLinear(bits=4, group_size=g, sym=True, desc_act=desc_act, in_features=k, out_features=n,
                              bias=False, pack_dtype=torch.int32)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(lin, name).data.copy_(t[name])
    if zero_format == "v1":
        convert_gptq_v1_to_v2_format_module(lin, bits=4, pack_dtype=torch.int32)
    lin.post_init()
    lin.eval()
    w = lin.dequantize_weight().double()
    w = w.T if tuple(w.shape) == (k, n) else w
    assert torch.equal(w, _dense(codes, scales, g_idx).half().double())
    codes_s, scales_s, perm = gptq.decode_tensors(t, g, zero_format)
    if desc_act:
        assert perm is not None and torch.equal(codes_s, codes[:, perm])
