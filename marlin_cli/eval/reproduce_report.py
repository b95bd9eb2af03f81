"""Markdown for a ``marlin reproduce`` record: the table (rows = models), protocols, checks, machine."""

from __future__ import annotations

from typing import Any

from marlin_cli.eval.reproduce_config import FP16
from marlin_cli.report import render_table
from marlin_cli.settings import METHODS

LABELS = {"fp16": "fp16", "rtn": "RTN", "gptq": "GPTQ"}
"""Column names in the table; a method not listed (``fast``, ``best``) is shown by its own name."""


def label(column: str) -> str:
    """The table's name for a column (``fp16`` or a method)."""
    return LABELS.get(column, column)


def columns(record: dict[str, Any]) -> list[str]:
    """The record's columns: ``fp16``, then its methods in the config's order."""
    return [FP16, *record["methods"]]


def _with_ratio(ppl: float | None, fp16: float | None) -> Any:
    """``ppl`` as ``"38.74 (1.230x)"``, its ratio to ``fp16`` beside it (just the number without an fp16)."""
    if ppl is None or not fp16:
        return ppl
    return f"{ppl:.2f} ({ppl / fp16:.3f}x)"


def main_table(record: dict[str, Any]) -> str:
    """Rows = models; per dataset: our fp16 ppl and each method's ppl with its ratio to fp16, then the original's
    reported ones (with their ratio to the original's fp16); then each method's quantization time and size."""
    names = [d["name"] for d in record["datasets"]]
    cols = columns(record)
    methods = cols[1:]
    ref_cols = {
        ds: [c for c in cols if any(c in row["reference"].get(ds, {}) for row in record["rows"])] for ds in names
    }
    headers = ["model"]
    for ds in names:
        headers += [f"{ds} {label(c)}" for c in cols]
        headers += [f"{ds} {label(c)} (orig)" for c in ref_cols[ds]]
    headers += [f"{label(m)} quantize s" for m in methods]
    headers += [f"{label(m)} MB" for m in methods]
    rows = []
    for row in record["rows"]:
        cells: list[Any] = [row["name"]]
        for ds in names:
            ours = {c: row["variants"][c]["datasets"][ds]["ppl"] for c in cols}
            cells += [ours[FP16]] + [_with_ratio(ours[m], ours[FP16]) for m in methods]
            ref = row["reference"].get(ds, {})
            cells += [ref.get(c) if c == FP16 else _with_ratio(ref.get(c), ref.get(FP16)) for c in ref_cols[ds]]
        cells += [f"{row['variants'][m]['checkpoint']['quantize_seconds']:.0f}" for m in methods]
        cells += [row["variants"][m]["checkpoint"]["size_mb"] for m in methods]
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
    """Seconds per model and column: quantization and evaluation (load + all datasets)."""
    rows = []
    for row in record["rows"]:
        for c in columns(record):
            entry = row["variants"][c]
            quant = entry.get("checkpoint", {}).get("quantize_seconds")
            rows.append([row["name"], label(c), quant, entry["seconds"]])
    return render_table(["model", "column", "quantize s", "total s"], rows)


def method_notes(record: dict[str, Any]) -> str:
    """One sentence per method column: what it does (the default marked)."""
    notes = []
    for m in record["methods"]:
        if m == "rtn":
            what = "rounds each weight to the nearest grid point of the same group size and reads no calibration data"
        else:
            what = METHODS[m]
        default = " (the default of `marlin quantize`)" if m == record.get("default_method") else ""
        notes.append(f"{label(m)}{default}: {what}.")
    return " ".join(notes)


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
            f"Perplexity (lower is better); '(1.230x)' is the ratio to the fp16 perplexity of the same row and "
            f"dataset. int4 symmetric, group size {q['group_size']}, damping {q['damp']}, "
            f"clipping {'on' if q['clip'] else 'off'}; calibration {q['dataset']} {q['nsamples']} x "
            f"{q['seqlen']} tokens, seed {q['seed']}, the same for every method. Evaluated in {record['dtype']} on "
            f"{record['device_name']}. '(orig)' columns: {record['reference_source']}. "
            f"{method_notes(record)} MB = 10^6 bytes of safetensors; quantize s: wall time of the quantization "
            "(calibration data included).",
            main_table(record),
            protocol_table(record),
            checks,
            timing_table(record),
            f"Total {record['seconds']:.0f} s. Command: `{record['command']}`. Versions: "
            + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        ]
    )
