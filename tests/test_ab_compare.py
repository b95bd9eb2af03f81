"""scripts/ab_compare.py: the per-layer table of kernel versions timed in one run (CPU, from JSON files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ab_compare.py"


def bench_json(path: Path, times: dict[tuple[int, int, int], tuple[float, float]]) -> Path:
    """A bench_kernel.py-shaped JSON: rows of (k, n, batch) -> (ours us, cuBLAS us), fp16 llama2-7b."""
    rows = [{"model": "llama2-7b", "dtype": "fp16", "k": k, "n": n, "batch": b, "ours_us": ours, "cublas_us": cb,
             "floor_us": 1.0, "paths_us": {}, "peers_us": {}} for (k, n, b), (ours, cb) in times.items()]
    path.write_text(json.dumps({"device": "test", "rows": rows}))
    return path


def test_ratios_are_each_tree_over_the_baseline_and_layers_missing_anywhere_are_left_out(tmp_path: Path) -> None:
    ab = tmp_path / "ab"
    ab.mkdir()
    bench_json(ab / "ab_main.json", {(4096, 4096, 256): (20.0, 18.0), (4096, 22016, 256): (80.0, 75.0),
                                     (11008, 4096, 256): (40.0, 48.0)})
    bench_json(ab / "ab_head.json", {(4096, 4096, 256): (25.0, 18.5), (4096, 22016, 256): (64.0, 74.0)})
    out = subprocess.run([sys.executable, str(SCRIPT), str(ab), "--json", str(tmp_path / "cmp.json")],
                         capture_output=True, text=True, check=True).stdout
    table = json.loads((tmp_path / "cmp.json").read_text())
    assert table["baseline"] == "main"  # ab_main.json first when a folder is given
    got = {(r["k"], r["n"]): (r["main"]["ratio"], r["head"]["ratio"], r["head"]["cublas_us"]) for r in table["rows"]}
    assert got == {(4096, 4096): (1.0, 1.25, 18.5), (4096, 22016): (1.0, 0.8, 74.0)}  # 11008 only in one tree
    assert "1.250" in out and "0.800" in out


def test_one_tree_or_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    one = bench_json(tmp_path / "ab_main.json", {(4096, 4096, 1): (10.0, 30.0)})
    for args in ([str(one)], [str(one), str(tmp_path / "ab_nope.json")]):
        r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.startswith("ab_compare: ") and len(r.stderr.strip().splitlines()) == 1
