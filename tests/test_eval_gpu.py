"""One Marlin checkpoint, two paths: the CUDA kernel on a GPU and the reference product give the same perplexity.

Self-contained (the GPU machine has no internet and no built-in assets): a small Llama with a byte-level
BPE tokenizer is made from this repository's own source text, quantized with GPTQ g128 by ``quantize``,
saved, and loaded by ``load_model`` three ways. Paths, per :mod:`gptq.linear` and :mod:`gptq.kernel`:

- CPU float32: the reference product (dequantized weights, float32) -- the oracle;
- GPU bfloat16: the fused Marlin kernel at every window length;
- GPU float16, 128-token windows: the fused kernel (M = 128 rows);
- GPU float16, 256-token windows: dequantize on the GPU + cuBLAS (M >= 129 rows).

Tolerance (relative perplexity difference to the float32 oracle): the same as the unquantized model's own
float16 / bfloat16 vs float32 difference on the same windows plus a small margin, i.e. "within float noise":
the 4-bit layers add no error of their own beyond the activations' rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here"),
]

REPO = Path(__file__).resolve().parents[1]
VOCAB, WINDOWS = 512, 12


def corpus_text() -> str:
    """This repository's Python sources, concatenated in name order (a few hundred KB of text)."""
    files = sorted(p for d in ("marlin_cli", "gptq", "tests") for p in (REPO / d).glob("*.py"))
    return "\n\n".join(p.read_text() for p in files)


def make_model(folder: Path, text: str) -> None:
    """A 2-layer Llama (hidden 256, 4/2 heads, MLP 512) with a 512-token byte-level BPE, saved to ``folder``.

    Weights are random with std 0.1 so that logits are far from uniform: the perplexity then depends on
    every weight, which makes it a sensitive check of the matrix products.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    bpe.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fp16 model folder, its GPTQ g128 checkpoint, and the evaluation tokens [T]."""
    from marlin_cli.pipeline.quantize import QuantizeJob, quantize
    from marlin_cli.settings import QuantSettings

    root = tmp_path_factory.mktemp("gpu_eval")
    text = corpus_text()
    (root / "corpus.txt").write_text(text)
    make_model(root / "fp16", text)
    options = QuantizeJob(model=str(root / "fp16"), out=root / "int4", settings=QuantSettings(
        dataset=str(root / "corpus.txt"), nsamples=16, seqlen=256, group_size=128, device="cpu", format="marlin",
    ))  # fmt: skip
    quantize(options, progress=False)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(root / "fp16")(text, add_special_tokens=False)["input_ids"]
    return {"fp16": root / "fp16", "int4": root / "int4", "tokens": torch.tensor(ids)}


def ppl(path: Path, tokens: torch.Tensor, device: str, dtype: torch.dtype, seqlen: int) -> float:
    """Stream perplexity of the first WINDOWS windows, model loaded by ``load_model``."""
    from marlin_cli.eval.perplexity import stream_perplexity
    from marlin_cli.loading import load_model

    loaded = load_model(str(path), device=device, dtype=dtype)
    return stream_perplexity(loaded.model, tokens, seqlen, max_windows=WINDOWS, progress=False).ppl


@pytest.mark.parametrize(
    ("dtype", "seqlen", "path"),
    [
        (torch.bfloat16, 256, "fused kernel"),
        (torch.float16, 128, "fused kernel"),
        (torch.float16, 256, "GPU dequantize + cuBLAS"),
    ],
)
def test_kernel_path_perplexity_equals_the_reference(
    setup: dict, dtype: torch.dtype, seqlen: int, path: str
) -> None:
    from gptq import kernel

    assert kernel.kernel_available(), "the CUDA extension did not build"
    oracle = ppl(setup["int4"], setup["tokens"], "cpu", torch.float32, seqlen)
    gpu = ppl(setup["int4"], setup["tokens"], "cuda", dtype, seqlen)
    # Float noise: the unquantized model's own low-precision vs float32 difference on the same windows.
    dense32 = ppl(setup["fp16"], setup["tokens"], "cpu", torch.float32, seqlen)
    dense_low = ppl(setup["fp16"], setup["tokens"], "cuda", dtype, seqlen)
    noise = abs(dense_low / dense32 - 1)
    diff = abs(gpu / oracle - 1)
    print(f"{path} {dtype} seqlen {seqlen}: int4 ppl {gpu:.4f} vs reference {oracle:.4f} (rel {diff:.2e}); "
          f"unquantized {dense_low:.4f} vs {dense32:.4f} (rel {noise:.2e})")  # fmt: skip
    assert diff <= 2 * noise + 1e-3


def test_float32_on_the_gpu_equals_the_cpu_reference(setup: dict) -> None:
    cpu = ppl(setup["int4"], setup["tokens"], "cpu", torch.float32, 256)
    gpu = ppl(setup["int4"], setup["tokens"], "cuda", torch.float32, 256)
    assert gpu == pytest.approx(cpu, rel=1e-4)


def test_quantize_on_the_gpu_matches_the_cpu_quantization(setup: dict, tmp_path: Path) -> None:
    """``--device cuda`` runs the layers in float16 on the GPU (the CPU runs them in float32): the same
    calibration gives nearly the same Hessians, so nearly the same codes, per-layer errors and perplexity."""
    import json

    from safetensors.torch import load_file

    from marlin_cli.pipeline.quantize import QuantizeJob, quantize
    from marlin_cli.settings import QuantSettings

    cpu_dir = setup["int4"]
    cpu_rec = json.loads((cpu_dir / "marlin_run.json").read_text())
    options = QuantizeJob(model=str(setup["fp16"]), out=tmp_path / "int4-cuda", settings=QuantSettings(
        dataset=cpu_rec["dataset"], nsamples=16, seqlen=256, group_size=128, device="cuda", format="marlin",
    ))  # fmt: skip
    result = quantize(options, progress=False)
    gpu_rec = json.loads((result.out_dir / "marlin_run.json").read_text())
    assert gpu_rec["device"] == "cuda" and gpu_rec["calibration_tokens"] == cpu_rec["calibration_tokens"]
    for c, g in zip(cpu_rec["layers"], gpu_rec["layers"], strict=True):
        assert c["name"] == g["name"] and g["rel_error"] == pytest.approx(c["rel_error"], rel=0.05), (c, g)
    cpu_t, gpu_t = load_file(cpu_dir / "model.safetensors"), load_file(result.out_dir / "model.safetensors")
    from gptq.format import unpack_padded

    name = "model.layers.1.mlp.down_proj"
    cpu_codes, _ = unpack_padded(cpu_t[f"{name}.qweight"], cpu_t[f"{name}.scales"], 128)
    gpu_codes, _ = unpack_padded(gpu_t[f"{name}.qweight"], gpu_t[f"{name}.scales"], 128)
    same = (cpu_codes == gpu_codes).float().mean().item()
    assert same > 0.8, same
    cpu_ppl = ppl(cpu_dir, setup["tokens"], "cuda", torch.float16, 256)
    gpu_ppl = ppl(result.out_dir, setup["tokens"], "cuda", torch.float16, 256)
    print(f"GPU-quantized ppl {gpu_ppl:.4f}, CPU-quantized {cpu_ppl:.4f}, identical codes {same:.3f}")
    assert gpu_ppl == pytest.approx(cpu_ppl, rel=0.01)
