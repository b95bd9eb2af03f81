"""compressed-tensors ``pack-quantized`` export, checked by the compressed-tensors library's own code.

The oracle is the library (a dev dependency): its ``PackedQuantizationCompressor`` decompresses our tensors,
compresses fake-quantized weights for our decoder, and its pydantic ``QuantizationConfig`` validates and
re-serializes our config dict.
"""

from __future__ import annotations

import pytest
import torch
from checkpoint_cache import signed_grid_random

from marlin_cli.errors import MarlinError
from marlin_cli.formats import compressed_tensors as ct

ctq = pytest.importorskip("compressed_tensors.quantization")
ct_compressors = pytest.importorskip("compressed_tensors.compressors")
ModelCompressor = ct_compressors.ModelCompressor
PackedQuantizationCompressor = ct_compressors.PackedQuantizationCompressor

SHAPES = [(1536, 576), (576, 1536), (96, 64), (64, 256)]  # (N, K): built-in model's MLP shapes and small ones
GROUPS = [32, 64, 128, -1]
DATA = ["random-sign", "signed-grid"]
"""Test data: uniform codes with scales of random sign, or issue 18's signed grid of a random weight (each
group's larger-magnitude side on code 0, so the scale is negative where that side is positive)."""


def _random(n: int, k: int, g: int, seed: int, data: str = "random-sign") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 [N, K] and fp16-representable float32 scales [N, G], about half of them negative."""
    if data == "signed-grid":
        return signed_grid_random(n, k, g, seed)
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g == -1 else k // g
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half().float()
    return codes, torch.where(torch.rand(n, groups, generator=gen) < 0.5, -scales, scales)


def _dense(codes: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """W = (q - 8) * s in float64, the definition (independent of both codecs)."""
    k = codes.shape[1]
    s = scales.double().repeat_interleave(k if g == -1 else g, dim=1)
    return (codes.double() - 8) * s


def _scheme(g: int):
    args = ctq.QuantizationArgs(num_bits=4, type="int", symmetric=True, dynamic=False,
                                strategy="channel" if g == -1 else "group", group_size=None if g == -1 else g)
    return ctq.QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


def _library_decompress(tensors: dict[str, torch.Tensor], g: int) -> torch.Tensor:
    return PackedQuantizationCompressor.decompress(dict(tensors), _scheme(g))["weight"]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_library_decompresses_our_export_exactly(n: int, k: int, g: int, data: str) -> None:
    if g != -1 and k % g:
        pytest.skip("K not a multiple of g")
    codes, scales = _random(n, k, g, seed=n * 7 + k + g, data=data)
    tensors = ct.encode_tensors(codes, scales, g, dtype=torch.float32)
    assert tensors["weight_packed"].dtype == torch.int32 and tuple(tensors["weight_packed"].shape) == (n, k // 8)
    assert tensors["weight_scale"].dtype == torch.float32 and tuple(tensors["weight_scale"].shape) == scales.shape
    assert tensors["weight_shape"].dtype == torch.int64 and tensors["weight_shape"].tolist() == [n, k]
    w = _library_decompress(tensors, g)
    assert w.shape == (n, k)
    # fp16-representable scales times |q - 8| <= 8 are exact in float32: the comparison can be exact.
    assert torch.equal(w.double(), _dense(codes, scales, g))
    assert (scales < 0).any() and (scales > 0).any()


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_library_decompress_in_model_dtype(dtype: torch.dtype, data: str) -> None:
    """In fp16/bf16 the library multiplies in that dtype; ours must equal (q - 8) * s rounded the same way."""
    n, k, g = 576, 1536, 64
    codes, scales = _random(n, k, g, seed=3, data=data)
    tensors = ct.encode_tensors(codes, scales, g, dtype=dtype)
    w = _library_decompress(tensors, g)
    s = tensors["weight_scale"].repeat_interleave(g, dim=1)
    assert w.dtype == dtype and torch.equal(w, (codes.to(dtype) - 8) * s)


def test_reversed_nibbles_are_caught() -> None:
    """Negative control: the same words with the 8 nibbles of each int32 reversed must not decompress right."""
    n, k, g = 1536, 576, 64
    codes, scales = _random(n, k, g, seed=11)
    tensors = ct.encode_tensors(codes, scales, g, dtype=torch.float32)
    p = tensors["weight_packed"].to(torch.int64) & 0xFFFFFFFF
    rev = torch.zeros_like(p)
    for i in range(8):
        rev |= ((p >> (4 * i)) & 0xF) << (4 * (7 - i))
    bad = dict(tensors, weight_packed=torch.where(rev >= 2**31, rev - 2**32, rev).to(torch.int32))
    assert not torch.equal(_library_decompress(bad, g).double(), _dense(codes, scales, g))
    assert torch.equal(_library_decompress(tensors, g).double(), _dense(codes, scales, g))


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("g", GROUPS)
def test_round_trip(g: int, data: str) -> None:
    n, k = 576, 1536
    codes, scales = _random(n, k, g, seed=5 + g, data=data)
    for dtype in (torch.float16, torch.float32):
        codes2, scales2, perm = ct.decode_tensors(ct.encode_tensors(codes, scales, g, dtype=dtype), group_size=g)
        assert perm is None and codes2.dtype == torch.uint8
        assert torch.equal(codes2, codes) and torch.equal(scales2, scales.to(dtype))


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("g", GROUPS)
def test_library_compress_decodes_through_ours(g: int, data: str) -> None:
    """The library packs a fake-quantized weight (W = (q - 8) * s exactly, negative s included); our decoder
    gets q and s back."""
    n, k = 1536, 576
    if g != -1 and k % g:
        g = 64
    codes, scales = _random(n, k, g, seed=17 + g, data=data)
    w = _dense(codes, scales, g).float()
    state = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scales.clone()}, _scheme(g))
    assert set(state) == {"weight_packed", "weight_scale", "weight_shape"}
    codes2, scales2, perm = ct.decode_tensors(state, group_size=g)
    assert perm is None and torch.equal(codes2, codes) and torch.equal(scales2, scales)
    assert torch.equal(state["weight_packed"], ct.encode_tensors(codes, scales, g, dtype=torch.float32)["weight_packed"])


def _library_config_json(g: int, ignore: list[str], version: str) -> dict:
    """What ModelCompressor.update_config of the installed library writes, from its own pydantic classes."""
    scheme = _scheme(g)
    scheme.weights.observer = "memoryless_minmax"  # set explicitly, as llm-compressor does
    qc = ctq.QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    return {"version": version, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}


_OMITTED_WHEN_UNSET = ("actorder", "block_structure", "scale_dtype", "zp_dtype", "observer_kwargs")


def _without_unset(qc: dict) -> dict:
    """Our dict as compressed-tensors >= 0.20 serializes it: explicit null/empty weight args left out."""
    out = dict(qc, moe_sparsity_config=None)
    out["config_groups"] = {
        name: dict(grp, weights={k: v for k, v in grp["weights"].items()
                                 if not (k in _OMITTED_WHEN_UNSET and v in (None, {}))})
        for name, grp in qc["config_groups"].items()
    }
    return out


# config.json's quantization_config written by llm-compressor 0.14.0.1 (compressed-tensors 0.19.0) for
# oneshot(QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])) on a small Llama.
LLM_COMPRESSOR_W4A16_G128 = {
    "config_groups": {"group_0": {
        "format": "pack-quantized", "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 128, "num_bits": 4,
                    "observer": "memoryless_minmax", "observer_kwargs": {}, "scale_dtype": None,
                    "strategy": "group", "symmetric": True, "type": "int", "zp_dtype": None}}},
    "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
    "transform_config": {}, "version": "0.19.0",
}


def test_config_is_llm_compressor_output() -> None:
    assert ct.build_config(128) == LLM_COMPRESSOR_W4A16_G128


@pytest.mark.parametrize("g", GROUPS)
def test_config_matches_library(g: int) -> None:
    ours = ct.build_config(g)
    # Validated by the installed library, it re-serializes to the library's own dump of the same scheme ...
    parsed = ctq.QuantizationConfig.model_validate(ours)
    expected = _library_config_json(g, ["lm_head"], ours["version"])
    dump = {"version": ours["version"], "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **parsed.model_dump(exclude=["quant_method"])}
    assert dump == expected
    # ... and differs from it only by the explicit nulls that compressed-tensors 0.20 leaves out.
    assert _without_unset(ours) == expected
    # And through our own parser.
    scheme = ct.parse_config(ours, "config.json")
    assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.act_order) == (4, g, True, False)
    assert scheme.ignore == ("lm_head",) and scheme.targets == ("Linear",)
    assert ct.parse_config(expected, "config.json") == scheme


def test_config_loads_in_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CompressedTensorsConfig.from_dict({"quantization_config": ct.build_config(64)})
    scheme = cfg.quantization_config.config_groups["group_0"]
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 64 and scheme.format == "pack-quantized"
    assert cfg.quantization_config.format == "pack-quantized" and cfg.is_quantization_compressed


def test_library_model_compressor_accepts_config() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CompressedTensorsConfig.from_dict({"quantization_config": ct.build_config(-1)})
    comp = ModelCompressor.from_compression_config(cfg)
    assert comp.quantization_config.config_groups["group_0"].weights.strategy == "channel"


def _cfg(**weights) -> dict:
    qc = ct.build_config(128)
    qc["config_groups"]["group_0"]["weights"].update(weights)
    return qc


@pytest.mark.parametrize("qc,field", [
    (_cfg(symmetric=False), "weights.symmetric"),
    (_cfg(num_bits=8), "weights.num_bits"),
    (_cfg(type="float", num_bits=8), "weights.type"),
    (_cfg(strategy="tensor", group_size=None), "weights.strategy"),
    (_cfg(dynamic=True), "weights.dynamic"),
    (dict(ct.build_config(128), sparsity_config={"format": "sparse-24-bitmask",
                                                        "sparsity_structure": "2:4"}), "sparsity_config"),
    (dict(ct.build_config(128), format="marlin-24"), "quantization_config.format"),
    (dict(ct.build_config(128), kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (dict(ct.build_config(128), quant_method="gptq"), "quant_method"),
    (dict(ct.build_config(128), quantization_status="frozen"), "quantization_status"),
])
def test_parse_config_refuses(qc: dict, field: str) -> None:
    with pytest.raises(MarlinError) as err:
        ct.parse_config(qc, "ckpt/config.json")
    msg = str(err.value)
    assert "\n" not in msg and "ckpt/config.json" in msg and field in msg


def test_parse_config_refuses_activation_quantization() -> None:
    qc = ct.build_config(128)
    qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "token",
                                                           "dynamic": True, "symmetric": True}
    with pytest.raises(MarlinError, match="group_0.input_activations"):
        ct.parse_config(qc, "config.json")


def test_parse_config_act_order_and_old_fields() -> None:
    # An older llm-compressor config: explicit nulls, an observer, actorder "group" (g_idx tensors).
    qc = _cfg(actorder="group", observer="minmax", observer_kwargs={}, block_structure=None)
    assert ct.parse_config(qc, "c").act_order
    assert not ct.parse_config(_cfg(actorder="weight"), "c").act_order
    assert not ct.parse_config(_cfg(actorder=None), "c").act_order
    assert not ct.parse_config(dict(ct.build_config(64), sparsity_config=None), "c").act_order
    # actorder "weight" is writable and the library accepts it.
    qc = ct.build_config(64, actorder="weight")
    assert ctq.QuantizationConfig.model_validate(qc).config_groups["group_0"].weights.actorder == "weight"


def test_act_order_g_idx_decode() -> None:
    """weight_g_idx (actorder group): decode sorts the columns; x[:, perm] @ W_sorted^T == x @ W^T."""
    n, k, g = 64, 256, 32
    gen = torch.Generator().manual_seed(23)
    order = torch.randperm(k, generator=gen)  # quantization order: column order[i] is the i-th quantized
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    codes, scales = _random(n, k, g, seed=29)
    w = (codes.double() - 8) * scales.double()[:, g_idx.long()]  # dense weight, each column its own group
    tensors = dict(ct.encode_tensors(codes, scales, g, dtype=torch.float32), weight_g_idx=g_idx)
    codes_s, scales_s, perm = ct.decode_tensors(tensors, group_size=g)
    assert perm is not None
    x = torch.randn(5, k, generator=gen, dtype=torch.float64)
    y = x[:, perm] @ _dense(codes_s, scales_s, g).T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-12, atol=1e-12)
    # A trivial g_idx means no permutation.
    tensors["weight_g_idx"] = (torch.arange(k) // g).to(torch.int32)
    assert ct.decode_tensors(tensors)[2] is None


def test_decode_refuses_bad_layers() -> None:
    codes, scales = _random(64, 128, 32, seed=1)
    good = ct.encode_tensors(codes, scales, 32)
    with pytest.raises(MarlinError, match="model.layers.0.mlp.up_proj: weight_zero_point"):
        ct.decode_tensors(dict(good, weight_zero_point=torch.zeros(8, 4, dtype=torch.int32)), "model.layers.0.mlp.up_proj")
    with pytest.raises(MarlinError, match="L: weight_shape"):
        ct.decode_tensors(dict(good, weight_shape=torch.tensor([64, 127])), "L")
    with pytest.raises(MarlinError, match="L: weight_packed"):
        ct.decode_tensors(dict(good, weight_packed=good["weight_packed"].to(torch.int64)), "L")
    with pytest.raises(MarlinError, match="group size 32, the config says 64"):
        ct.decode_tensors(good, "L", group_size=64)
    bad_gidx = torch.zeros(128, dtype=torch.int32)
    bad_gidx[:40] = 1
    with pytest.raises(MarlinError, match="L: weight_g_idx"):
        ct.decode_tensors(dict(good, weight_g_idx=bad_gidx), "L")


def test_which_layers_fail() -> None:
    shapes = {"q_proj": (576, 576), "down_proj": (1536, 576), "odd": (100, 64)}
    assert ct.which_layers_fail(shapes, 64) == ["odd: K = 100 is not a multiple of 8 (int4 packing into int32)"]
    fails = ct.which_layers_fail(shapes, 128)
    assert fails[0] == "q_proj: K = 576 is not a multiple of the group size 128" and len(fails) == 2
    assert ct.which_layers_fail({"q_proj": (576, 576)}, -1) == []
