"""The wgmma kernel's work plans (csrc/marlin_plan.h), compiled for the host with nvcc and checked against their
contract: the plan's blocks cover every work item (unit x 64-row k tile) exactly once, in contiguous runs (so a
block holds parts of at most two units, its first and its last: its two scratch slots), cutting units only where
the plan says so; `unit_blocks` names exactly the blocks that hold a unit's segments (the segment-sum kernel adds
those). No GPU needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
PROGRAM = r"""
#include <cstdio>
#include "marlin_plan.h"
int main() {
  int m, n, k, mt, wg, slots;
  while (std::scanf("%d %d %d %d %d %d", &m, &n, &k, &mt, &wg, &slots) == 6) {
    const marlin::Plan p = marlin::wgmma_plan(m, n, k, mt, wg, slots);
    const int k_tiles = k / marlin::kTileK, units = (m + mt - 1) / mt * ((n + 64 * wg - 1) / (64 * wg));
    std::printf("plan %d %d %d %d %d %d %d %d\n", p.grid, p.splits, p.tiles_per_block, units, k_tiles,
                marlin::plan_cuts(p, k_tiles) ? 1 : 0, p.dp_units, marlin::first_cut_unit(p));
    for (int b = 0; b < p.grid; ++b) {
      const marlin::WorkRange r =
          marlin::work_range(b, p.splits, p.tiles_per_block, k_tiles, units * k_tiles, p.dp_units);
      std::printf("%d %d\n", r.w0, r.w1);
    }
    for (int u = 0; u < units; ++u) {
      int first = 0, count = 0;
      marlin::unit_blocks(u, k_tiles, p.splits, p.tiles_per_block, first, count, p.dp_units);
      std::printf("%d %d\n", first, count);
    }
  }
  return 0;
}
"""
LAYERS = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (8192, 10240), (8192, 57344), (28672, 8192),
          (192, 128), (1024, 22016))
# (rows per tile, consumer warpgroups) of the kernel's configurations and the rows each takes.
TILES = {16: 4, 32: 4, 64: 4, 128: 4, 256: 2}
ROWS = (1, 16, 30, 64, 100, 128, 200, 256, 300, 512, 1024, 1100, 2048, 70000)


def _tile(m: int) -> int:
    return next((t for t in (16, 32, 64, 128) if m <= t), 256)


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[tuple, tuple, list, list]]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed (the plan header is compiled for the host with it)")
    tmp = tmp_path_factory.mktemp("plan")
    (tmp / "plan.cu").write_text(PROGRAM)
    subprocess.run([nvcc, "-std=c++17", f"-I{CSRC}", str(tmp / "plan.cu"), "-o", str(tmp / "plan")], check=True)
    cases = [(m, n, k, _tile(m), TILES[_tile(m)], slots) for k, n in LAYERS for m in ROWS for slots in (132, 114, 78)]
    stdin = "".join(" ".join(map(str, c)) + "\n" for c in cases)
    lines = iter(subprocess.run([str(tmp / "plan")], input=stdin, capture_output=True, text=True,
                                check=True).stdout.splitlines())
    out = []
    for case in cases:
        head = tuple(map(int, next(lines).split()[1:]))
        grid, units = head[0], head[3]
        ranges = [tuple(map(int, next(lines).split())) for _ in range(grid)]
        owners = [tuple(map(int, next(lines).split())) for _ in range(units)]
        out.append((case, head, ranges, owners))
    return out


def test_every_work_item_is_run_once(plans) -> None:
    for case, (_, _, _, units, k_tiles, cuts, _, _), ranges, _ in plans:
        assert all(w1 > w0 for w0, w1 in ranges), (case, "a block with no work")
        tiling = sorted(ranges)
        assert tiling[0][0] == 0 and tiling[-1][1] == units * k_tiles, case
        assert all(a[1] == b[0] for a, b in zip(tiling, tiling[1:], strict=False)), (case, "a gap or an overlap")
        # Units are cut only where the plan says so (then the segment-sum kernel runs).
        if not cuts:
            assert all(w0 % k_tiles == 0 and w1 % k_tiles == 0 for w0, w1 in ranges), case


def test_unit_blocks_names_the_blocks_of_each_unit(plans) -> None:
    for case, (_, _, _, units, k_tiles, _, _, _), ranges, owners in plans:
        holders: list[list[int]] = [[] for _ in range(units)]
        for b, (w0, w1) in enumerate(ranges):
            for u in range(w0 // k_tiles, (w1 - 1) // k_tiles + 1):
                holders[u].append(b)
        for u, (first, count) in enumerate(owners):
            assert holders[u] == list(range(first, first + count)), (case, u)


def test_whole_waves_first_then_stream_k(plans) -> None:
    """Waves-then-stream-k plans: blocks 0 .. dp_units - 1 run whole units (they have no scratch slots: the kernel
    indexes slots by block - dp_units), only units from first_cut_unit on are cut (the segment-sum kernel starts at
    its column block), and the stream-k blocks fit one launch of one block per SM (each SM runs them in its last
    turn)."""
    hybrids = 0
    for case, (grid, splits, _, units, k_tiles, _, dp, first_cut), ranges, owners in plans:
        slots = case[5]
        if dp == 0:
            continue
        hybrids += 1
        assert splits == 0 and dp % slots == 0 and 0 < dp < units, case
        assert all(ranges[b] == (b * k_tiles, (b + 1) * k_tiles) for b in range(dp)), case
        assert grid - dp <= slots, case
        assert first_cut == dp, case
        cut = [u for u, (_, count) in enumerate(owners) if count > 1]
        assert cut and min(cut) >= first_cut, case
    # 4096 x 22016 at m = 1024 on 132 SMs: 688 units of 256 x 128, five whole waves, 28 units cut over all SMs.
    assert hybrids > 0
    (head,) = [h for c, h, _, _ in plans if c == (1024, 22016, 4096, 256, 2, 132)]
    assert head[6] == 660 and head[0] - 660 <= 132
