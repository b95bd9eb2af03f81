"""The numerical core: GPTQ solver, symmetric 4-bit quantizer, Marlin packing format and the kernel op.

Nothing in this package imports transformers, the CLI or does file I/O.
"""
