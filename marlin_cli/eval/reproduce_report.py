"""Markdown for a ``marlin reproduce`` record: the table (rows = models), protocols, checks, machine."""

from __future__ import annotations

from typing import Any

from marlin_cli.eval.reproduce_config import VARIANTS
from marlin_cli.report import render_table

LABELS = {"fp16": "fp16", "rtn": "RTN", "gptq": "GPTQ"}


def main_table(record: dict[str, Any]) -> str:
    """Rows = models; per dataset: our fp16 / RTN / GPTQ ppl, then the original's reported ones; then sizes."""
    names = [d["name"] for d in record["datasets"]]
    ref_variants = {
        ds: [v for v in VARIANTS if any(v in row["reference"].get(ds, {}) for row in record["rows"])]
        for ds in names
    }
    headers = ["model"]
    for ds in names:
        headers += [f"{ds} {LABELS[v]}" for v in VARIANTS]
        headers += [f"{ds} {LABELS[v]} (orig)" for v in ref_variants[ds]]
    headers += ["RTN MB", "GPTQ MB"]
    rows = []
    for row in record["rows"]:
        cells: list[Any] = [row["name"]]
        for ds in names:
            cells += [row["variants"][v]["datasets"][ds]["ppl"] for v in VARIANTS]
            cells += [row["reference"].get(ds, {}).get(v) for v in ref_variants[ds]]
        cells += [row["variants"][v]["checkpoint"]["size_mb"] for v in ("rtn", "gptq")]
        rows.append(cells)
    return render_table(headers, rows)


def protocol_table(record: dict[str, Any]) -> str:
    """How each dataset was measured (from the first model's fp16 records): protocol, length, counts, hash."""
    first = record["rows"][0]["variants"]["fp16"]["datasets"]
    rows = []
    for spec in record["datasets"]:
        rec = first[spec["name"]]
        bound = spec["max_windows"] if rec["protocol"] == "stream" else spec["max_docs"]
        count = rec["windows"] if rec["protocol"] == "stream" else rec["documents"]
        unit = "windows" if rec["protocol"] == "stream" else "documents"
        rows.append(
            [
                spec["name"],
                rec["protocol"],
                spec["seqlen"],
                f"{count} {unit}" + (f" (bounded to {bound})" if bound else ""),
                rec["tokens_scored"],
                str(rec["dataset"].get("sha256", ""))[:16],
            ]
        )
    return render_table(["dataset", "protocol", "seqlen", "scored", "tokens", "sha256"], rows)


def timing_table(record: dict[str, Any]) -> str:
    """Seconds per model and variant: quantization and evaluation (load + all datasets)."""
    rows = []
    for row in record["rows"]:
        for v in VARIANTS:
            entry = row["variants"][v]
            quant = entry.get("checkpoint", {}).get("quantize_seconds")
            rows.append([row["name"], LABELS[v], quant, entry["seconds"]])
    return render_table(["model", "variant", "quantize s", "total s"], rows)


def render_markdown(record: dict[str, Any]) -> str:
    """The whole report for README or CI logs."""
    q = record["settings"]
    checks = render_table(
        ["model", "dataset", "check", "result", "detail"],
        [
            [c["model"], c["dataset"], c["check"], "pass" if c["passed"] else "FAIL", c["detail"]]
            for c in record["checks"]
        ],
    )
    return "\n\n".join(
        [
            f"## Reproduction `{record['config']}` ({record['config_path']})",
            record["description"],
            f"Perplexity (lower is better). int4 symmetric, group size {q['group_size']}, damping {q['damp']}, "
            f"clipping {'on' if q['clip'] else 'off'}; calibration {q['dataset']} {q['nsamples']} x "
            f"{q['seqlen']} tokens, seed {q['seed']}. Evaluated in {record['dtype']} on {record['device_name']}. "
            f"'(orig)' columns: {record['reference_source']}. RTN rounds each weight to the nearest grid "
            "point of the same group size and reads no calibration data. MB = 10^6 bytes of safetensors.",
            main_table(record),
            protocol_table(record),
            checks,
            timing_table(record),
            f"Total {record['seconds']:.0f} s. Command: `{record['command']}`. Versions: "
            + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        ]
    )
