// How a call's work is cut between thread blocks: the split and stream-k plans of both fused kernels
// (marlin_kernel.cu, marlin_wgmma.cu), their policies, and the rules by which a block finds its work and the
// segment-sum kernels find a unit's blocks.
//
// A unit is one tile of C (the mma.sync kernel: a column block of all m rows; the wgmma kernels: a row tile x
// a column block) over all of k. It has k_tiles work items (64-row k tiles), numbered w = u * k_tiles + kt.
//  - split plan: every unit is cut into `splits` equal parts, one block each; block b runs part b % splits of
//    unit b / splits (then every block has one segment and the same work);
//  - stream-k plan (splits == 0): block b runs the tiles_per_block consecutive work items from
//    b * tiles_per_block, across unit boundaries: the same work for every SM whatever the shape, at the cost
//    of up to two segments per block. With dp_units > 0 (the wgmma kernel's waves-then-stream-k plan) the first
//    dp_units units are whole, one block each (blocks 0 .. dp_units - 1), and the stream-k runs cover the rest.
// A unit cut between blocks ("segments") gets its fp32 partial sums from scratch added in block order by the
// kernel's segment-sum kernel: deterministic, no block waits on another, no state between launches.
#pragma once

#include <cuda_runtime.h>

namespace marlin {

constexpr int kTileK = 64;  // k rows per work item (pipeline stage) in both kernels

struct Plan {
  int grid;             // thread blocks of the plan
  int splits;           // split plan: parts per unit; 0: stream-k plan
  int tiles_per_block;  // stream-k plan: work items per block; 0: split plan
  int dp_units = 0;     // stream-k plan: units run whole by blocks 0 .. dp_units - 1 before the stream-k runs
};

// First work item of stream-k block `block` (>= dp_units): no division, for the segment-sum kernel's inner loop.
__host__ __device__ __forceinline__ int stream_k_start(int block, int tiles_per_block, int k_tiles, int dp_units) {
  return dp_units * k_tiles + (block - dp_units) * tiles_per_block;
}

// Work items w0..w1-1 of block `block` (`total`: units x k_tiles).
struct WorkRange {
  int w0, w1;
};
__host__ __device__ __forceinline__ WorkRange work_range(int block, int splits, int tiles_per_block, int k_tiles,
                                                         int total, int dp_units = 0) {
  if (splits > 0) {
    const int u = block / splits, part = block - u * splits;
    return {u * k_tiles + part * k_tiles / splits, u * k_tiles + (part + 1) * k_tiles / splits};
  }
  if (block < dp_units) return {block * k_tiles, (block + 1) * k_tiles};
  const int w0 = stream_k_start(block, tiles_per_block, k_tiles, dp_units);
  return {w0, w0 + tiles_per_block < total ? w0 + tiles_per_block : total};
}

// The blocks that hold segments of unit u: first .. first + count - 1.
__host__ __device__ __forceinline__ void unit_blocks(int u, int k_tiles, int splits, int tiles_per_block, int& first,
                                                     int& count, int dp_units = 0) {
  if (splits > 0) {
    first = u * splits;
    count = splits;
    return;
  }
  if (u < dp_units) {
    first = u;
    count = 1;
    return;
  }
  const int w = (u - dp_units) * k_tiles;  // the unit's first work item, counted from the stream-k part's first
  first = dp_units + w / tiles_per_block;
  count = dp_units + (w + k_tiles - 1) / tiles_per_block - first + 1;
}

// Parts per unit for a split plan that runs in one wave of `slots` blocks with parts of at least min_run work
// items (0 when the units alone do not fit one wave).
inline int parts_in_one_wave(int units, int k_tiles, int slots, int min_run) {
  const int by_slots = slots / units, by_run = k_tiles / min_run;
  return by_slots < by_run ? by_slots : by_run;
}

inline Plan split_plan(int units, int splits) { return {units * splits, splits, 0, 0}; }

// Stream-k over `slots` block slots, runs of at least min_run work items (or all of them).
inline Plan stream_k_plan(int units, int k_tiles, int slots, int min_run) {
  const long long total = static_cast<long long>(units) * k_tiles;
  long long run = (total + slots - 1) / slots;
  if (run < min_run) run = total < min_run ? total : min_run;
  return {static_cast<int>((total + run - 1) / run), 0, static_cast<int>(run), 0};
}

// Whether some unit is cut between blocks (then the segment-sum kernel runs).
inline bool plan_cuts(const Plan& p, int k_tiles) {
  return p.splits > 1 || (p.splits == 0 && p.tiles_per_block % k_tiles != 0);
}

// The units that blocks share start at unit first_cut (the segment-sum kernel's columns start at its column block).
inline int first_cut_unit(const Plan& p) { return p.splits > 0 ? 0 : p.dp_units; }

// Most segments any unit is cut into.
inline int max_segments(const Plan& p, int k_tiles) {
  return p.splits > 0 ? p.splits : (k_tiles + p.tiles_per_block - 1) / p.tiles_per_block + 1;
}

// ---- The mma.sync kernel (units: column blocks of tile_n columns, m <= 64 rows per launch) ----

// Shortest part (work items) of a unit, chosen from measurements on the H100 (Llama-2 shapes): m <= 4 is
// fastest with the finest split (up to 64 segments); 4 < m <= 16 with runs of >= m/4 tiles; m > 16 with at
// most 16 segments (finer splits cost 20-35% at m = 32 and 64). Each segment of a strip costs m x 64 fp32
// partial sums written and read back through L2 (512 m bytes) against 2 KB of weights per tile, and a serial
// step in the reduction.
inline int mma_min_run(int m, int k_tiles) {
  if (m > 16) return (k_tiles + 15) / 16;
  const int by_split = (k_tiles + 63) / 64;
  const int by_rows = m <= 4 ? 1 : (m + 3) / 4;
  return by_split > by_rows ? by_split : by_rows;
}

// Parts per column block of the mma kernel's split plan (at least 1).
inline int mma_splits(int n, int k, int m, int slots, int tile_n) {
  const int k_tiles = k / kTileK, units = (n + tile_n - 1) / tile_n;
  const int s = parts_in_one_wave(units, k_tiles, slots, mma_min_run(m, k_tiles));
  return s < 1 ? 1 : s;
}

// The split plan where it keeps >= 90% of the block slots busy, and always for m > 16 (measured on the
// H100: never slower, and 10-25% faster at m = 32 and 64); else stream-k (e.g. n = 57344 at m <= 16:
// 224 column blocks x 2 parts fill 85% of 528 slots, and stream-k was 2% faster).
inline Plan mma_plan(int n, int k, int m, int slots, int tile_n) {
  const int k_tiles = k / kTileK, units = (n + tile_n - 1) / tile_n;
  const int splits = mma_splits(n, k, m, slots, tile_n);
  if (m <= 16 && units * splits * 10 < slots * 9) return stream_k_plan(units, k_tiles, slots, mma_min_run(m, k_tiles));
  return split_plan(units, splits);
}

// ---- The wgmma kernels (units: row tiles of mt rows x column blocks of 64 wg columns) ----

constexpr int kWgmmaMinRun = 4;  // work items per block at least

// The split plan when one wave of equal parts fills >= 85% of the slots; else, with more units than slots, whole
// units in waves (then only the last wave's units are cut, below); else stream-k. Measured on the H200 (fp16,
// m = 48..256, Llama-2 layers): stream-k is up to 18% faster where the split plans need several waves or leave SMs
// idle (e.g. 4096x12288, 8192x57344), up to 10% slower where one wave of equal parts fits (e.g. 28672x8192,
// 11008x4096).
inline Plan wgmma_plan(int m, int n, int k, int mt, int wg, int slots) {
  const int m_tiles = (m + mt - 1) / mt;
  const int units = m_tiles * ((n + 64 * wg - 1) / (64 * wg));
  const int k_tiles = k / kTileK;
  const int s = parts_in_one_wave(units, k_tiles, slots, kWgmmaMinRun);
  if (s >= 1 && units * s * 100 >= slots * 85) return split_plan(units, s);
  // Several row tiles and waves of units >= 95% full: whole units, one block each, no segment sums. Measured on
  // the H100 against stream-k at m = 512 and 1024 (256-row tiles, the eight Llama-2 layers, fp16 and bf16, round
  // 8): 4-15% faster per model, up to 26% per layer (fp16 70B 28672x8192, m = 1024: 838.8 -> 618.0 us).
  const int waves = (units + slots - 1) / slots;
  if (m_tiles >= 2 && units >= slots && units * 100 >= waves * slots * 95) return split_plan(units, 1);
  // More units than slots otherwise: the full waves run whole units, and the rest is cut into stream-k runs over
  // all slots, so only the last wave's units have segment sums. Measured on the H100 (round 10, A/B in one run)
  // on the layers it changes, against stream-k over all units or (87% full) whole units: 3-16% faster per
  // layer (fp16 7B 4096x22016 m = 256: 83.3 -> 70.4 us; 70B 8192x10240 m = 1024: 258.3 -> 229.2; 7B 4096x22016
  // m = 1024, whole units in 87%-full waves: 267.4 -> 247.8).
  if (units > slots) {
    const int dp = units / slots * slots;
    Plan p = stream_k_plan(units - dp, k_tiles, slots, kWgmmaMinRun);
    if (p.tiles_per_block % k_tiles == 0) return split_plan(units, 1);  // the rest runs whole too
    p.grid += dp;
    p.dp_units = dp;
    return p;
  }
  return stream_k_plan(units, k_tiles, slots, kWgmmaMinRun);
}

}  // namespace marlin
