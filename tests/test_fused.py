"""Fusion of MarlinLinears that read the same input: tensor level (:mod:`gptq.fused`) and model level
(:mod:`marlin_cli.fuse`), on the CPU reference path and, where a GPU is visible, through the kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptq import format as fmt
from gptq.fused import FusedMarlinLinear, can_fuse
from gptq.linear import MarlinLinear
from marlin_cli.eval.bench import quantize_rtn
from marlin_cli.fuse import FusedPart, fuse_model, is_fused


def _random_layer(k: int, n: int, g: int, gen: torch.Generator, bias: bool = False,
                  perm: torch.Tensor | None = None) -> MarlinLinear:
    groups = 1 if g == -1 else -(-k // g)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    return MarlinLinear.from_codes(codes, scales, g, bias=b, perm=perm)


@pytest.mark.parametrize("k,ns,g", [(576, (576, 192, 192), 128), (576, (1536, 1536), 64), (100, (70, 130, 64), 32),
                                    (256, (128, 96), -1)])
def test_fused_outputs_equal_each_part(k: int, ns: tuple[int, ...], g: int) -> None:
    gen = torch.Generator().manual_seed(k + sum(ns))
    parts = [_random_layer(k, n, g, gen, bias=i == 1).float() for i, n in enumerate(ns)]
    fused = FusedMarlinLinear(parts)
    # The concatenated packing is the packing of the concatenated matrix (layout local to 64-column strips).
    dense = fmt.dequantize(fused.fused.qweight, fused.fused.scales, g, torch.float32)
    for p, off in zip(parts, fused.offsets, strict=True):
        part_dense = fmt.dequantize(p.qweight, p.scales, g, torch.float32)
        assert torch.equal(dense[:, off: off + p.packed.n_pad], part_dense)
    x = torch.randn(3, 5, k, generator=gen)
    outs = fused(x)
    for p, out in zip(parts, outs, strict=True):
        want = p(x)
        assert out.shape == want.shape == (3, 5, p.out_features)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_act_order_parts_fuse_only_with_the_same_permutation() -> None:
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(256, generator=gen)
    a, b = _random_layer(256, 64, 64, gen, perm=perm), _random_layer(256, 128, 64, gen, perm=perm)
    other = _random_layer(256, 64, 64, gen, perm=torch.randperm(256, generator=gen))
    plain = _random_layer(256, 64, 64, gen)
    assert can_fuse([a, b]) and not can_fuse([a, other]) and not can_fuse([a, plain])
    assert not can_fuse([a, _random_layer(256, 64, 128, gen, perm=perm)])  # group size differs
    fused = FusedMarlinLinear([a.float(), b.float()])
    x = torch.randn(4, 256, generator=gen)
    for part, out in zip((a, b), fused(x), strict=True):
        torch.testing.assert_close(out, part(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fuse only"):
        FusedMarlinLinear([a, other])


def _builtin_quantized(model_dir: Path, layers: int, group_size: int = 64):  # noqa: ANN202 - a transformers model
    """The built-in model cut to ``layers`` decoder layers, fp32, with RTN Marlin linears (CPU path)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    quantize_rtn(model, group_size)
    return model.float()


def test_fused_model_logits_equal_unfused(builtin_model_dir: Path) -> None:
    model = _builtin_quantized(builtin_model_dir, layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    keys_before = set(model.state_dict())
    created = fuse_model(model)
    assert len(created) == 6 and is_fused(model)  # q/k/v and gate/up of each of the 3 layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, FusedPart) and isinstance(mlp.up_proj, FusedPart)
    assert isinstance(attn.o_proj, MarlinLinear) and isinstance(mlp.down_proj, MarlinLinear)
    assert attn.fused_q_proj_k_proj_v_proj.offsets == (0, 576, 768)
    # each weight once in the state dict: the parts own no tensors
    keys = set(model.state_dict())
    assert not any(".q_proj." in k or ".gate_proj." in k for k in keys)
    assert len(keys) == len(keys_before) - 5 * 3 * 3 + 2 * 3 * 3  # 5 layers' (qweight, scales, shape) -> 2 fused
    calls = []
    for name, module in model.named_modules():
        if name.endswith(("fused_q_proj_k_proj_v_proj.fused", "fused_gate_proj_up_proj.fused")):
            module.register_forward_hook(lambda *_a, n=name: calls.append(n))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert len(calls) == 6  # one matmul per group per forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # as perplexity runs it: inference tensors have no version counter
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_shared_product_is_never_stale() -> None:
    gen = torch.Generator().manual_seed(2)
    parts = [_random_layer(128, 64, 64, gen).float() for _ in range(2)]
    parent = torch.nn.Module()
    parent.a, parent.b = parts

    class Spec:
        layers = "layers"
        sequential = (("0.a", "0.b"),)

    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.layers[0].add_module("0", parent)
    assert fuse_model(holder, Spec()) == ["layers.0.0.fused_a_b"]
    x = torch.randn(2, 128, generator=gen)
    torch.testing.assert_close(parent.a(x), parts[0](x))
    x.mul_(2)  # same tensor object, new contents: recomputed (version counter)
    torch.testing.assert_close(parent.b(x), parts[1](x))
    y = torch.randn(2, 128, generator=gen)
    torch.testing.assert_close(parent.a(y), parts[0](y))
    torch.testing.assert_close(parent.a(y), parts[0](y))  # a part read twice before the other: recomputed
    torch.testing.assert_close(parent.b(y), parts[1](y))


# ------------------------------------------------------------------------------------------------ GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here")


@gpu
@pytest.mark.parametrize("m", [1, 16, 200])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_kernel_equals_parts(m: int, dtype: torch.dtype) -> None:
    """Through the kernel, fused vs one by one: each within the kernel's bound (tests/test_kernel_gpu.py:
    relative error < 1e-3 against the fp32 product rounded to the output dtype). The layer adds its bias to
    the product already rounded to the dtype, so the reference does too (a reference rounded once, after the
    bias, puts the second bf16 rounding into the error: 2.6-2.7e-3 on an H100, for fused and unfused alike)."""
    gen = torch.Generator().manual_seed(m)
    k, ns, g = 4096, (4096, 1024, 1024), 128
    parts = [_random_layer(k, n, g, gen, bias=True).to("cuda", dtype) for n in ns]
    fused = FusedMarlinLinear(parts)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)

    def rel_err(out: torch.Tensor, ref32: torch.Tensor) -> float:
        ref = ref32.to(out.dtype).float()
        return ((out.float() - ref).norm() / ref.norm()).item()

    for p, got in zip(parts, fused(x), strict=True):
        product = (x.float() @ p.dense_weight(torch.float32, x.device)[:, : p.out_features]).to(dtype)
        ref32 = (product + p.bias).float()
        assert rel_err(got, ref32) < 1e-3 and rel_err(p(x), ref32) < 1e-3


@gpu
def test_fused_model_on_gpu_matches_and_captures() -> None:
    """A random 2-layer Llama (GQA, fp16, RTN g128) fused vs unfused on the GPU, eager and in a CUDA graph.

    Self-contained: the GPU machine has no built-in assets."""
    from marlin_cli.eval.bench import DecodeStep, synthetic_model

    dims = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 4096}
    model = synthetic_model(dims, torch.float16, "cuda")
    quantize_rtn(model, 128)
    ids = torch.randint(0, model.config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        assert len(fuse_model(model)) == 4
        got = model(input_ids=ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"fused vs unfused logits, relative error {rel:.2e}")
    assert rel < 5e-3
    step = DecodeStep(model, batch=4, context=33, max_len=64)
    eager = step().float().clone()  # also the warm-up of every kernel the graph will hold
    graphed = DecodeStep(model, batch=4, context=33, max_len=64)  # same prompt (seed 0), fresh cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed()
    graph.replay()
    torch.cuda.synchronize()
    assert (out.float() - eager).abs().max().item() <= 1e-2 * eager.abs().max().item()


def test_load_model_fuses_when_asked(tmp_path: Path, builtin_model_dir: Path) -> None:
    """``load_model(fuse=True)`` (the default on CUDA) on a real checkpoint: same logits, one matmul a group."""
    from checkpoint_cache import shallow_copy

    from marlin_cli.loading import load_model
    from marlin_cli.pipeline.quantize import QuantizeJob, quantize
    from marlin_cli.settings import QuantSettings

    small = shallow_copy(builtin_model_dir, tmp_path / "small", layers=2)
    ckpt = tmp_path / "ckpt"
    quantize(QuantizeJob(model=str(small), out=ckpt, settings=QuantSettings(group_size=64, nearest=True,
                                                                              format="marlin")), progress=False)
    plain = load_model(str(ckpt), "cpu").model  # the CPU default: not fused
    fused = load_model(str(ckpt), "cpu", fuse=True).model
    assert not is_fused(plain) and is_fused(fused)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
