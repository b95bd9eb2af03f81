"""What rounding the scaled weights to bf16 costs a quantized model, on the CPU.

The wgmma kernel keeps bf16 exact up to fp32 sums: it multiplies the unscaled ``q - 8`` products by the fp32
scales (docs/kernel.md). vLLM's Marlin and Machete round ``(q - 8) * s`` to bf16 before the tensor cores, as
any bf16 GEMM on dequantized weights does. This script measures both numerics on a Marlin checkpoint in bf16
with the same activations and layers:

- ``exact``: every MarlinLinear computes in float32 (float32 weights, float32 product), output rounded to bf16:
  the wgmma kernel's numerics up to the order of its fp32 sums.
- ``rounded``: weights dequantized to float32, rounded to bf16, bf16 GEMM (fp32 accumulation): the peers'.

It prints, per mode, the stream perplexity of the model on a built-in corpus, and the relative error of the
first window's linear outputs against a float64 product of the same bf16 inputs (all layers pooled), and
saves the table as JSON.

Usage: python scripts/bf16_rounding.py CHECKPOINT [--dataset botchan] [--seqlen 2048] [--max-windows 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from gptq import format as fmt
from gptq.linear import MarlinLinear
from marlin_cli.eval.ppl import EvalOptions, evaluate_perplexity

MODES = ("exact", "rounded")


def mode_output(layer: MarlinLinear, x2: torch.Tensor, mode: str) -> torch.Tensor:
    """``x2 [rows, K_pad]`` bf16 -> ``[rows, N_pad]`` bf16 with ``mode``'s numerics (no bias). The weights are the
    layer's cached dequantization (float32, or float32 rounded to bf16)."""
    if mode == "exact":
        return (x2.float() @ layer.dense_weight(torch.float32, x2.device)).to(torch.bfloat16)
    return x2 @ layer.dense_weight(torch.bfloat16, x2.device)


@contextlib.contextmanager
def numerics(mode: str, errors: list[tuple[float, float]] | None = None) -> Iterator[None]:
    """Within the block every MarlinLinear on the CPU computes with ``mode``'s numerics. With ``errors``, each call
    of the first forward pass (until some layer is called a second time) also appends (squared error, squared
    norm) of its output against the float64 product."""
    original = MarlinLinear.forward
    seen: set[int] = set()  # the layers of the first pass
    first_pass = errors is not None

    def forward(self: MarlinLinear, x: torch.Tensor) -> torch.Tensor:
        nonlocal first_pass
        if x.dtype != torch.bfloat16:
            return original(self, x)
        x2 = self.padded_input(x)
        out = mode_output(self, x2, mode)
        first_pass = first_pass and id(self) not in seen
        if first_pass:
            seen.add(id(self))
            ref = x2.double() @ fmt.dequantize(self.qweight, self.scales, self.group_size, torch.float64)
            errors.append(((out.double() - ref).square().sum().item(), ref.square().sum().item()))
        return self.finish_output(out, x.shape[:-1])

    MarlinLinear.forward = forward
    try:
        yield
    finally:
        MarlinLinear.forward = original


def measure(checkpoint: str, dataset: str, seqlen: int, max_windows: int) -> list[dict]:
    """One row per mode: perplexity and the pooled relative error of the first window's linear outputs."""
    rows = []
    for mode in MODES:
        errors: list[tuple[float, float]] = []
        with numerics(mode, errors):
            rec = evaluate_perplexity(
                EvalOptions(model=checkpoint, dataset=dataset, seqlen=seqlen, max_windows=max_windows,
                            device="cpu", dtype="bfloat16", progress=False)
            )
        err = math.sqrt(sum(e for e, _ in errors) / sum(n for _, n in errors))
        rows.append({"mode": mode, "ppl": rec["ppl"], "linear_rel_err_vs_float64": err, "linear_calls": len(errors)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a Marlin checkpoint folder (marlin quantize / reproduce output)")
    parser.add_argument("--dataset", default="botchan")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="save the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(args.checkpoint, args.dataset, args.seqlen, args.max_windows)
    print(f"{args.checkpoint}, {args.dataset}, seqlen {args.seqlen}, {args.max_windows} windows, bf16 on the CPU")
    print(f"{'mode':8s} {'ppl':>10s} {'linear rel. err vs float64':>28s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['ppl']:10.4f} {r['linear_rel_err_vs_float64']:28.2e}")
    base = rows[0]["ppl"]
    print(f"rounded / exact perplexity: {rows[1]['ppl'] / base:.5f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "dataset": args.dataset,
                                         "seqlen": args.seqlen, "max_windows": args.max_windows, "rows": rows},
                                        indent=2))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
