"""Checkpoint formats: one module per format on disk (Marlin kernel layout, compressed-tensors, GPTQ)."""
