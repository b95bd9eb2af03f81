"""On the GPU: imported act-order checkpoints run through our kernel as on the CPU, and vLLM's own repacking
(``gptq_marlin_repack``) turns our GPTQ export into exactly our Marlin tensors, which vLLM's ``marlin_gemm``
multiplies as our kernel does.

Self-contained (the GPU machine has no internet and no built-in assets): the 2-layer Llama of
``test_eval_gpu.py`` (hidden 256, MLP 512: K = 256 / 512, N = 128..512, all within vLLM's Marlin shape rule).
vLLM's kernels come from its PyPI wheel's ``vllm/_C_stable_libtorch.abi3.so`` (or the same .xz-compressed),
given by ``MARLIN_VLLM_OPS``, with the same wheel's ``scalar_type.py`` beside it (or ``MARLIN_VLLM_SCALAR_TYPE``);
without it those tests are skipped. The wheel and the .so never enter the repository.
"""

from __future__ import annotations

import importlib.util
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here"),
]

G = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fp16 2-layer model, its RTN g128 Marlin checkpoint and that checkpoint exported to GPTQ."""
    from test_eval_gpu import corpus_text, make_model

    from marlin_cli.pipeline.export import export_checkpoint
    from marlin_cli.pipeline.quantize import QuantizeJob, quantize
    from marlin_cli.settings import QuantSettings

    root = tmp_path_factory.mktemp("serve_gpu")
    make_model(root / "fp16", corpus_text())
    quantize(QuantizeJob(model=str(root / "fp16"), out=root / "marlin",
                         settings=QuantSettings(group_size=G, nearest=True, format="marlin")), progress=False)
    export_checkpoint(str(root / "marlin"), "gptq", root / "gptq")
    return {"fp16": root / "fp16", "marlin": root / "marlin", "gptq": root / "gptq"}


def _logits(folder: Path, device: str, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    from marlin_cli.loading import load_model

    model = load_model(str(folder), device=device, dtype=dtype).model
    with torch.no_grad():
        return model(ids.to(device)).logits.float().cpu()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_imported_act_order_checkpoint_kernel_path_equals_cpu_path(tiny: dict[str, Path], tmp_path: Path,
                                                                   dtype: torch.dtype) -> None:
    import serve_checkpoints as sc

    from gptq import kernel

    assert kernel.kernel_available(), "the CUDA extension did not build"
    sc.write_checkpoint(tiny["fp16"], tmp_path / "act", "gptq", G, act_order=True)
    ids = torch.randint(0, 512, (4, 96), generator=torch.Generator().manual_seed(0))
    cpu = _logits(tmp_path / "act", "cpu", torch.float32, ids)
    gpu = _logits(tmp_path / "act", "cuda", dtype, ids)
    # Float noise: the unquantized model's own low-precision GPU vs float32 CPU difference on the same ids.
    noise = float((_logits(tiny["fp16"], "cuda", dtype, ids) - _logits(tiny["fp16"], "cpu", torch.float32, ids))
                  .abs().max())
    diff = float((gpu - cpu).abs().max())
    print(f"act-order GPTQ g{G} {dtype}: kernel vs CPU max |dlogit| {diff:.3e}, dense model's noise {noise:.3e}")
    assert diff <= 2 * noise + 1e-3 * float(cpu.abs().max())


class VllmOps:
    """vLLM's ``gptq_marlin_repack`` and ``marlin_gemm``, called by argument name against the loaded schema
    (arguments vLLM added later take their defaults), as ``scripts/bench_kernel.py`` does."""

    def __init__(self, so: Path, scalar_type: Path) -> None:
        if so.suffix == ".xz":
            plain = Path(tempfile.gettempdir()) / "marlin_vllm_C_stable_libtorch.abi3.so"
            if not plain.exists():
                with lzma.open(so) as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            so = plain
        torch.ops.load_library(str(so))
        spec = importlib.util.spec_from_file_location("vllm_scalar_type", scalar_type)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.uint4b8 = module.scalar_types.uint4b8.id
        self.repack_op = torch.ops._C.gptq_marlin_repack.default
        self.gemm_op = torch.ops._C.marlin_gemm.default
        print("vLLM schemas:", self.repack_op._schema, "|", self.gemm_op._schema)

    @staticmethod
    def call(op, **named):  # noqa: ANN001, ANN003, ANN205
        args = []
        for arg in op._schema.arguments:
            if arg.name in named:
                args.append(named[arg.name])
            elif arg.has_default_value():
                args.append(arg.default_value)
            elif "Optional" in str(arg.type) or str(arg.type).endswith("?"):
                args.append(None)
            else:
                raise RuntimeError(f"no value for {arg.name} of {op._schema}")
        return op(*args)

    def repack(self, gptq_qweight: torch.Tensor, k: int, n: int) -> torch.Tensor:
        perm = torch.empty(0, dtype=torch.int32, device=gptq_qweight.device)
        return self.call(self.repack_op, b_q_weight=gptq_qweight, perm=perm, size_k=k, size_n=n, num_bits=4)

    def gemm(self, a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, k: int, n: int) -> torch.Tensor:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        workspace = torch.zeros(sms * 4, dtype=torch.int32, device="cuda")
        return self.call(self.gemm_op, a=a, b_q_weight=qweight, b_scales=scales, workspace=workspace,
                         b_q_type_id=self.uint4b8, b_type_id=self.uint4b8, size_m=a.shape[0], size_n=n, size_k=k,
                         is_k_full=True, use_atomic_add=False, use_fp32_reduce=True, is_zp_float=False)


@pytest.fixture(scope="module")
def vllm() -> VllmOps:
    path = os.environ.get("MARLIN_VLLM_OPS")
    if not path:
        pytest.skip("MARLIN_VLLM_OPS is not set (path to vLLM's _C_stable_libtorch.abi3.so[.xz])")
    so = Path(path)
    scalar_type = Path(os.environ.get("MARLIN_VLLM_SCALAR_TYPE", so.parent / "scalar_type.py"))
    return VllmOps(so, scalar_type)


def test_vllm_repack_of_our_gptq_export_is_our_marlin_qweight(tiny: dict[str, Path], vllm: VllmOps) -> None:
    import json

    from safetensors.torch import load_file

    from gptq import format as fmt
    from gptq import kernel

    gptq_t = load_file(tiny["gptq"] / "model.safetensors", device="cuda")
    marlin_t = load_file(tiny["marlin"] / "model.safetensors", device="cuda")
    modules = json.loads((tiny["marlin"] / "config.json").read_text())["quantization_config"]["modules"]
    assert modules
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for name in modules:
        k, n = (int(v) for v in marlin_t[f"{name}.shape"].cpu())
        repacked = vllm.repack(gptq_t[f"{name}.qweight"], k, n)
        ours = marlin_t[f"{name}.qweight"]
        assert repacked.dtype == ours.dtype and repacked.shape == ours.shape, (name, repacked.shape, ours.shape)
        assert torch.equal(repacked, ours), name
        scales = marlin_t[f"{name}.scales"]
        for m in (1, 16, 64):
            a = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.float16)
            theirs = vllm.gemm(a, repacked, scales, k, n).float()
            mine = kernel.marlin_gemm(a, ours, scales, G).float()
            ref = a.float() @ fmt.dequantize(ours, scales, G, torch.float32).to("cuda")
            scale = float(ref.abs().max())
            rel = float((theirs - mine).abs().max()) / scale
            worst = max(worst, rel)
            assert float((mine - ref).abs().max()) <= 2e-3 * scale, (name, m)
            assert rel <= 2e-3, (name, m, rel)
    print(f"vLLM gptq_marlin_repack == our Marlin qweight for {len(modules)} linears; vLLM marlin_gemm vs ours: "
          f"max |diff| / max |ref| = {worst:.2e}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_vllm_marlin_gemm_with_negative_scales(vllm: VllmOps, dtype: torch.dtype) -> None:
    """Signed per-group scales (issue 18's grid puts the larger-magnitude side of each group on level -8, so
    about half the scales are negative): vLLM's marlin_gemm on our Marlin tensors equals the float64 product
    of the codes and the signed scales within its usual error (measured on positive scales: 2.8e-4 fp16,
    2.2e-3 bf16, against the float64 product), and agrees with our kernel."""
    from gptq import format as fmt
    from gptq import kernel

    k, n = 4096, 1024
    gen = torch.Generator().manual_seed(18)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    sign = torch.where(torch.rand(k // G, n, generator=gen) < 0.5, -1.0, 1.0)
    scales = (sign * (torch.rand(k // G, n, generator=gen) * 0.02 + 1e-3)).to(dtype)
    qweight, packed, _ = fmt.pack(codes, scales, G)
    qweight, packed = qweight.cuda(), packed.cuda()
    weight = (codes.double() - 8) * scales.double().repeat_interleave(G, 0)
    limit = 1e-3 if dtype == torch.float16 else 5e-3
    for m in (1, 16, 64, 200):
        a = torch.randn(m, k, generator=gen).to(dtype)
        ref = a.double() @ weight
        theirs = vllm.gemm(a.cuda(), qweight, packed, k, n).double().cpu()
        mine = kernel.marlin_gemm(a.cuda(), qweight, packed, G).double().cpu()
        err_theirs = float((theirs - ref).norm() / ref.norm())
        err_mine = float((mine - ref).norm() / ref.norm())
        agree = float((theirs - mine).norm() / ref.norm())
        print(f"negative scales {dtype} m={m}: vLLM {err_theirs:.2e}, ours {err_mine:.2e}, vLLM vs ours {agree:.2e}")
        assert err_theirs < limit and err_mine < limit and agree < 2 * limit, (m, err_theirs, err_mine, agree)
