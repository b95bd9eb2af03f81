"""Random-weight Llama models of real dimensions, for benchmarks and tests of the quantization pipeline.

:func:`build_synthetic` writes a Hugging Face model folder: ``config.json`` (Llama), fp16 safetensors (one
shard per decoder layer plus one for the rest, with an index; weights ~N(0, 0.02), norms 1) and the built-in
model's tokenizer (so calibration runs on real token ids; the vocabulary is the tokenizer's).
Memory: one layer's weights at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS: dict[str, dict[str, int]] = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32},
    "llama2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                   "num_key_value_heads": 8},
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 4},
}
"""Llama-2-7B, Llama-2/3-70B (8 kv heads) and two small shapes for CPU tests."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def layer_params(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """Weights of one decoder layer (attention, MLP, two norms)."""
    kv = hidden // heads * kv_heads
    return hidden * (2 * hidden + 2 * kv) + 3 * hidden * intermediate + 2 * hidden


def build_synthetic(out: Path, preset: str | dict[str, int], layers: int, tokenizer_dir: Path, seed: int = 0,
                    device: str = "cpu", vocab_size: int | None = None) -> Path:
    """Write a random Llama model to ``out`` (created) and return it.

    Args:
        preset: a name of :data:`PRESETS` or a dict of the same keys.
        layers: decoder layers.
        tokenizer_dir: a model folder whose tokenizer files are copied (the built-in model's).
        device: where the random numbers are drawn (``cuda`` is much faster for 70B layers); written from CPU.
        vocab_size: default: the tokenizer's vocabulary (token ids must fit the embedding).
    """
    dims = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out / name)
    if vocab_size is None:
        vocab_size = len(json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["model"]["vocab"])
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    heads, kv_heads = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "vocab_size": vocab_size, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float16", "bos_token_id": 0, "eos_token_id": 0, "attention_bias": False,
        "mlp_bias": False, "head_dim": head_dim,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.float16).cpu()

    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], fname: str) -> None:
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})

    save({"model.embed_tokens.weight": rand(vocab_size, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
          "lm_head.weight": rand(vocab_size, hidden)}, "rest.safetensors")
    kv = head_dim * kv_heads
    for i in range(layers):
        p = f"model.layers.{i}"
        save({
            f"{p}.self_attn.q_proj.weight": rand(hidden, hidden), f"{p}.self_attn.k_proj.weight": rand(kv, hidden),
            f"{p}.self_attn.v_proj.weight": rand(kv, hidden), f"{p}.self_attn.o_proj.weight": rand(hidden, hidden),
            f"{p}.mlp.gate_proj.weight": rand(inter, hidden), f"{p}.mlp.up_proj.weight": rand(inter, hidden),
            f"{p}.mlp.down_proj.weight": rand(hidden, inter),
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
        }, f"layer-{i:05d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
