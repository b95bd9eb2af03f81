"""Per-layer comparison of kernel versions timed in one run by ``scripts/ab_kernel.sh run``.

Reads the JSON each tree's ``bench_kernel.py`` wrote (``ab_<tree>.json``) and prints, for every (dtype, model,
layer k x n, batch), each tree's time of ours in us and its ratio to the first tree's, with cuBLAS's time in the
same trees as the run's own noise yardstick (cuBLAS is the same code in every tree). Sums over a model's layers
hide a layer that got slower while another got faster; this table does not.

Usage: python3 scripts/ab_compare.py ab/ab_main.json ab/ab_head.json [...]   (the first file is the baseline
column: ratios are tree / first), or a folder holding ab_*.json (then ab_main.json is the baseline).
Also writes the table as JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

Key = tuple[str, str, int, int, int]  # dtype, model, k, n, batch


def load(path: Path) -> tuple[str, dict[Key, dict]]:
    """(tree name, rows by key) of one ab_<tree>.json."""
    data = json.loads(path.read_text())
    rows = {(r["dtype"], r["model"], int(r["k"]), int(r["n"]), int(r["batch"])): r for r in data["rows"]}
    return path.stem.removeprefix("ab_"), rows


def files_from(args: list[str]) -> list[Path]:
    """The JSON files named, or the ab_*.json of one folder with ab_main.json first."""
    if len(args) == 1 and Path(args[0]).is_dir():
        found = sorted(Path(args[0]).glob("ab_*.json"), key=lambda p: (p.name != "ab_main.json", p.name))
        if not found:
            sys.exit(f"ab_compare: no ab_*.json in {args[0]}; pass the folder ab_kernel.sh left (inside ab.tgz)")
        return found
    missing = [a for a in args if not Path(a).is_file()]
    if missing:
        sys.exit(f"ab_compare: no such file: {', '.join(missing)}")
    return [Path(a) for a in args]


def compare(trees: list[tuple[str, dict[Key, dict]]]) -> list[dict]:
    """One record per key present in every tree: ours and cuBLAS us per tree, ours / baseline's ours."""
    base = trees[0][1]
    common = [k for k in base if all(k in rows for _, rows in trees[1:])]
    out = []
    for key in sorted(common):
        rec: dict = dict(zip(("dtype", "model", "k", "n", "batch"), key, strict=True))
        for name, rows in trees:
            r = rows[key]
            rec[name] = {"ours_us": r["ours_us"], "cublas_us": r["cublas_us"],
                         "ratio": r["ours_us"] / base[key]["ours_us"]}
        out.append(rec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="ab_<tree>.json files (first = baseline), or their folder")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    trees = [load(p) for p in files_from(args.files)]
    if len(trees) < 2:
        sys.exit("ab_compare: give at least two trees' JSON files")
    records = compare(trees)
    names = [n for n, _ in trees]
    head = f"{'dtype':5} {'model':11} {'k':>6} {'n':>6} {'batch':>5}"
    print(head + "".join(f" {n[:14]:>14} {'x':>6}" for n in names) + "   cuBLAS us per tree")
    for rec in records:
        line = f"{rec['dtype']:5} {rec['model']:11} {rec['k']:6d} {rec['n']:6d} {rec['batch']:5d}"
        line += "".join(f" {rec[n]['ours_us']:14.1f} {rec[n]['ratio']:6.3f}" for n in names)
        line += "   " + " / ".join(f"{rec[n]['cublas_us']:.1f}" for n in names)
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": names[0], "rows": records}, indent=1))


if __name__ == "__main__":
    main()
