"""marlin: GPTQ quantization with group grid clipping, Marlin-format export and perplexity evaluation."""

__version__ = "0.1.0"
