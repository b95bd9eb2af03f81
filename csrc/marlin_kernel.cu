// The fused Marlin kernel: C[m, n] = A[m, k] @ dequant(B)[k, n] for m <= 64 per launch, fp32 accumulation.
//
// Work split. The output is cut into column blocks of 64*WARPS columns and k into tiles of 64 rows;
// a (column block, k tile) pair is one unit of work, numbered column-block-major. Two plans:
//  - split: every column block's k range is cut into `splits` equal parts; block b takes column block
//    b / splits, part b % splits.
//  - stream-k: each block streams one contiguous run of `tiles_per_cta` units, so every SM gets the same
//    amount of weight to read whatever the shape (used when column blocks x parts would leave SMs idle).
// A block that covers only part of a column block's k range produces a partial sum ("segment") in an
// fp32 scratch buffer; a second small kernel adds the segments of each split column block in segment
// order and writes C. Results are bit-identical from run to run, no block ever waits on another, and
// there is no state left between launches (graph-safe).
//
// Inside a block: WARPS warps, one 64-column strip each, over the 64 x 64*WARPS tile (4 k16 strips per
// warp).
// Weights, activations and scales flow through a STAGES-deep cp.async pipeline in shared memory. Each
// warp dequantizes its 16-byte weight vectors with bit tricks straight into mma.sync m16n8k16 B fragments
// (bf16: q - 8, exact; fp16: q - 8 plus a fixed offset, exact, with no arithmetic, the offset times the
// activation sums removed by one extra mma per strip) and accumulates one scale group in fp32; at the end
// of each group (every 128 k rows at most) the group sum is multiplied by its fp32 scale and added to the
// running sum. Scaling in fp32 (not the weights in 16 bits) keeps bf16 results as accurate as fp16 ones.
// For m <= 8 the operands are swapped (weights as the mma's A operand, activations as its n8 B operand):
// half the mmas and accumulators.
#include "marlin_kernel.h"
#include "marlin_launch.cuh"
#include "marlin_layout.cuh"
#include "marlin_plan.h"
#include "marlin_ptx.cuh"
#include "marlin_sm90.h"

#include <type_traits>

namespace marlin {

constexpr int kStrips = 4;      // k16 strips (16 rows x 64 columns, one 16-byte load per lane) per warp per tile
static_assert(16 * kStrips == kTileK, "a pipeline stage is one work item of the plan (marlin_plan.h)");
constexpr int kMaxRows = 64;    // rows of A per launch at most (four m16 blocks)
// MARLIN_KERNEL_AUTO takes the wgmma kernel from this m on, where available: fp16 from 9 rows, bf16 from 17.
// Measured on an H100 (docs/kernel.md, round 7; sums over the Llama-2 layers, mma.sync / wgmma us): fp16 7B
// m = 8 60.2 / 61.6, 12 66.3 / 62.7, 16 70.1 / 63.5; 70B m = 8 187.9 / 196.1, 12 201.1 / 198.8, 16 207.9 / 201.0;
// bf16 7B m = 16 72.4 / 67.8, 24 80.8 / 75.5; 70B m = 16 213.8 / 226.6, 24 279.1 / 244.8.
constexpr int wgmma_min_rows(int dtype) { return dtype == MARLIN_FP16 ? 9 : 17; }

// Shared memory of one pipeline stage, in 16-byte vectors, for WARPS warps (one 64-column strip each).
template <int M_BLOCKS, int WARPS>
struct StageLayout {
  static constexpr int kTileN = 64 * WARPS;         // columns per column block
  static constexpr int kB = WARPS * kStrips * 32;   // weights: warp x strip x lane
  static constexpr int kA = M_BLOCKS * 16 * 8;      // activations: 16*M_BLOCKS rows x 64 halves (swizzled)
  static constexpr int kS = 2 * kTileN / 8;         // scales: up to 2 group rows x kTileN columns
  static constexpr int kStage = kB + kA + kS;
};

// Dynamic shared memory bytes for one block.
template <int M_BLOCKS, int WARPS, int STAGES>
constexpr int smem_bytes() {
  return 16 * STAGES * StageLayout<M_BLOCKS, WARPS>::kStage;
}

// acc += scale * (grp - hi) for this lane's columns, then grp = hi = 0. `ss` points at the warp's 64 scales
// of one group row in shared memory (Marlin-permuted: grouped within 64 columns, per-channel within 32).
// hi[b]: the dequantization offsets (Traits<T>::dequant_offset: kLoOffset on k rows 0..7, kHiOffset on rows
// 8..15 of each strip) x the group's activation sums, laid out as an mma C fragment of m16 block b (same
// value in elements 0, 1 and in 2, 3; zero without Traits<T>::kHasOffset).
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void fold_group(float (&acc)[M_BLOCKS][8][4], float (&grp)[M_BLOCKS][8][4],
                                           float (&hi)[M_BLOCKS][4], const int4* ss, bool per_channel, int lane) {
  using Tr = Traits<T>;
  float s0[8], s1[8];  // scales of columns 2*(lane%4) and 2*(lane%4)+1 of each n8 tile
  if (per_channel) {
    // Position 8i + jj of each 32 columns holds column 2i + (0,1,8,9,16,17,24,25)[jj].
    const int4 v0 = ss[lane % 4];
    const int4 v1 = ss[4 + lane % 4];
    const T* h0 = reinterpret_cast<const T*>(&v0);
    const T* h1 = reinterpret_cast<const T*>(&v1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s0[j] = Tr::to_float(h0[2 * j]);
      s1[j] = Tr::to_float(h0[2 * j + 1]);
      s0[j + 4] = Tr::to_float(h1[2 * j]);
      s1[j + 4] = Tr::to_float(h1[2 * j + 1]);
    }
  } else {
    // Position 8i + j of each 64 columns holds column 8j + i: the 8 n8 tiles' scales of column i.
    const int4 v0 = ss[2 * (lane % 4)];
    const int4 v1 = ss[2 * (lane % 4) + 1];
    const T* h0 = reinterpret_cast<const T*>(&v0);
    const T* h1 = reinterpret_cast<const T*>(&v1);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s0[j] = Tr::to_float(h0[j]);
      s1[j] = Tr::to_float(h1[j]);
    }
  }
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      acc[b][j][0] += s0[j] * (grp[b][j][0] - hi[b][0]);
      acc[b][j][1] += s1[j] * (grp[b][j][1] - hi[b][1]);
      acc[b][j][2] += s0[j] * (grp[b][j][2] - hi[b][2]);
      acc[b][j][3] += s1[j] * (grp[b][j][3] - hi[b][3]);
      grp[b][j][0] = grp[b][j][1] = grp[b][j][2] = grp[b][j][3] = 0.f;
    }
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b) hi[b][0] = hi[b][1] = hi[b][2] = hi[b][3] = 0.f;
}

// acc *= scale for this lane's columns (per-channel layout, see fold_group).
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void scale_per_channel(float (&acc)[M_BLOCKS][8][4], const int4* ss, int lane) {
  using Tr = Traits<T>;
  const int4 v0 = ss[lane % 4];
  const int4 v1 = ss[4 + lane % 4];
  const T* h0 = reinterpret_cast<const T*>(&v0);
  const T* h1 = reinterpret_cast<const T*>(&v1);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const T* h = j < 4 ? h0 : h1;
    const float s0 = Tr::to_float(h[2 * (j % 4)]), s1 = Tr::to_float(h[2 * (j % 4) + 1]);
#pragma unroll
    for (int b = 0; b < M_BLOCKS; ++b) {
      acc[b][j][0] *= s0;
      acc[b][j][1] *= s1;
      acc[b][j][2] *= s0;
      acc[b][j][3] *= s1;
    }
  }
}

// End of a segment for one warp's strip: write the sum to C when the segment is the strip's whole k range,
// else to the segment's slot in scratch ([strip][seg][64 rows][64 columns] fp32) for reduce_kernel.
template <typename T, int M_BLOCKS>
__device__ __forceinline__ void finish_segment(const float (&acc)[M_BLOCKS][8][4], T* c, float* scratch, int m,
                                               int n, int strip, int seg, bool whole, int max_segs, int lane) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  const int row0 = lane / 4;        // + 8 * h + 16 * b: this lane's rows
  const int col0 = 2 * (lane % 4);  // + 8 * j: this lane's column pair in n8 tile j
  float* part = scratch + static_cast<size_t>(strip * max_segs + seg) * (kMaxRows * 64);
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = b * 16 + h * 8 + row0;
      if (row < m) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (whole) {
            *reinterpret_cast<T2*>(c + static_cast<size_t>(row) * n + strip * 64 + 8 * j + col0) =
                Tr::pack2(acc[b][j][2 * h], acc[b][j][2 * h + 1]);
          } else {
            *reinterpret_cast<float2*>(part + row * 64 + 8 * j + col0) =
                make_float2(acc[b][j][2 * h], acc[b][j][2 * h + 1]);
          }
        }
      }
    }
}

// Swapped operands (m <= 8): the mma computes C^T = dequant(B)^T A^T, weights as the 16-row A operand and
// the activations as the n8 B operand, so one mma covers 16 columns x 8 rows instead of two mmas over 16
// (mostly padding) rows. Lane l's accumulator of 16x16 tile j holds columns 16j + l/4 (+8 for elements 2,
// 3) of rows 2(l%4), 2(l%4)+1. Column positions in the scale layout: scale_pos (marlin_layout.cuh).

// acc += scale * (grp - hi) for this lane's 8 columns (swapped layout), then grp = hi = 0. `ss`: the
// warp's 64 scales; hi[0], hi[1]: the dequantization offsets x the group's activation sums (see fold_group)
// for rows 2(lane%4), 2(lane%4)+1.
template <typename T>
__device__ __forceinline__ void fold_group_t(float (&acc)[4][4], float (&grp)[4][4], float (&hi)[4], const int4* ss,
                                             bool per_channel, int lane) {
  using Tr = Traits<T>;
  float s[4][2];  // [tile j][column half]
  if (per_channel) {
    const T* h = reinterpret_cast<const T*>(ss);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) s[j][e] = Tr::to_float(h[scale_pos(16 * j + lane / 4 + 8 * e, true)]);
  } else {
    // Columns 16j + lane/4 and 16j + 8 + lane/4 sit at positions 8(lane/4) + 2j and + 2j + 1: one vector.
    const int4 v = ss[lane / 4];
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j][0] = Tr::to_float(h[2 * j]), s[j][1] = Tr::to_float(h[2 * j + 1]);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[j][0] += s[j][0] * (grp[j][0] - hi[0]);
    acc[j][1] += s[j][0] * (grp[j][1] - hi[1]);
    acc[j][2] += s[j][1] * (grp[j][2] - hi[0]);
    acc[j][3] += s[j][1] * (grp[j][3] - hi[1]);
    grp[j][0] = grp[j][1] = grp[j][2] = grp[j][3] = 0.f;
  }
  hi[0] = hi[1] = hi[2] = hi[3] = 0.f;
}

// finish_segment for the swapped layout (same destinations).
template <typename T>
__device__ __forceinline__ void finish_segment_t(const float (&acc)[4][4], T* c, float* scratch, int m, int n, int strip,
                                                 int seg, bool whole, int max_segs, int lane) {
  float* part = scratch + static_cast<size_t>(strip * max_segs + seg) * (kMaxRows * 64);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int row = 2 * (lane % 4) + e;
    if (row < m) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = 16 * j + lane / 4 + 8 * h;
          if (whole) {
            c[static_cast<size_t>(row) * n + strip * 64 + col] = Traits<T>::from_float(acc[j][2 * h + e]);
          } else {
            part[row * 64 + col] = acc[j][2 * h + e];
          }
        }
    }
  }
}

// C[row, col] = sum over the segments of col's column block, for split column blocks. 2^lanes_log2
// consecutive lanes split the segments into fixed contiguous parts, add each in order, then add the parts
// in order: the association depends only on the plan, so results are identical run to run. (Several
// lanes per output only pay off when there are many segments, i.e. for small m.)
template <typename T>  // half or __nv_bfloat16: element type of C
__global__ void reduce_kernel(const float* __restrict__ scratch,  // [n/64, max_segs, 64, 64] partial sums
                              T* __restrict__ c,                  // [m, n] output
                              int m,                              // rows, 1..64
                              int n,                              // columns, multiple of 64
                              int k_tiles,                        // k / 64
                              int tiles_per_cta,                  // stream-k run length of the gemm launch
                              int splits,                         // split plan: k parts per column block, else 0
                              int strips_per_block,               // 64-column strips per column block
                              int max_segs,                       // segment slots per strip
                              int lanes_log2) {                   // log2 of lanes per output: 0, 1, 2
  using T2 = typename Traits<T>::T2;
  grid_dependency_wait();  // the gemm kernel's partial sums
  launch_dependents();
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  const int lanes = 1 << lanes_log2;
  const int idx = tid >> lanes_log2;  // one column pair of one row
  const int quarter = tid & (lanes - 1);
  const bool valid = idx < m * (n / 2);
  const int row = valid ? idx / (n / 2) : 0, col = valid ? 2 * (idx % (n / 2)) : 0;
  const int strip = col / 64;
  int first = 0, n_segs = 0;
  unit_blocks(strip / strips_per_block, k_tiles, splits, tiles_per_cta, first, n_segs);
  const int per_lane = (n_segs + lanes - 1) >> lanes_log2;
  const int s_begin = quarter * per_lane;
  const int s_end = valid && n_segs > 1 ? min(s_begin + per_lane, n_segs) : s_begin;
  const float* src = scratch + static_cast<size_t>(strip * max_segs) * (kMaxRows * 64) + row * 64 + col % 64;
  float2 sum = make_float2(0.f, 0.f);
  constexpr int kBatch = 16;  // loads in flight at once
  for (int s0 = s_begin; s0 < s_end; s0 += kBatch) {
    float2 v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (s0 + i < s_end) {
        v[i] = __ldcg(reinterpret_cast<const float2*>(src + static_cast<size_t>(s0 + i) * (kMaxRows * 64)));
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (s0 + i < s_end) {
        sum.x += v[i].x;
        sum.y += v[i].y;
      }
    }
  }
  // Add the parts in order on the group's first lane (all lanes take part in the shuffles).
  float2 total = sum;
  for (int q = 1; q < lanes; ++q) {
    const float x = __shfl_down_sync(0xffffffffu, sum.x, q, lanes);
    const float y = __shfl_down_sync(0xffffffffu, sum.y, q, lanes);
    total.x += x;
    total.y += y;
  }
  if (valid && quarter == 0 && n_segs > 1) {  // unsplit column blocks were written by the gemm kernel
    *reinterpret_cast<T2*>(c + static_cast<size_t>(row) * n + col) = Traits<T>::pack2(total.x, total.y);
  }
}

// Fused dequantize + matrix product.
template <typename T,     // half or __nv_bfloat16: element type of A, scales and C
          int M_BLOCKS,   // m16 row blocks handled (1: m <= 16, 2: m <= 32)
          int WARPS,      // warps per block = 64-column strips per column block (4 or 8)
          int STAGES,     // cp.async pipeline depth, in 64 x (64*WARPS) tiles
          int MIN_BLOCKS, // thread blocks per SM the register allocation must allow
          bool SCALE_B,   // true: grouped scales multiply the dequantized weights in 16 bits before the
                          // mma (no per-group fp32 sums: fewer registers, fp16 only); false: fp32 scaling
          bool SWAP>      // swapped operands for m <= 8 (M_BLOCKS == 1, !SCALE_B): see fold_group_t
__global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS)
    gemm_kernel(const T* __restrict__ a,           // [m, lda] activations (first k columns used)
                const int4* __restrict__ qweight,  // [k/16, n/2] packed codes as 16-byte vectors
                const T* __restrict__ scales,      // [k/group, n] or [1, n], Marlin-permuted columns
                T* __restrict__ c,                 // [m, n] output
                float* __restrict__ scratch,       // [n/64, max_segs, 64, 64] fp32 partial sums
                int m,                             // rows of A and C, 1..16*M_BLOCKS
                int n,                             // columns of C, multiple of 64
                int k,                             // depth, multiple of 64
                int lda,                           // row stride of A in elements
                int group,                         // rows per scale group: 32, 64, 128, or k per channel
                int per_channel,                   // 1: scales use the per-channel permutation
                int tiles_per_cta,                 // stream-k: units of work per block (last may get fewer)
                int splits,                        // split plan: k parts per column block; 0: stream-k
                int max_segs) {                    // segment slots per strip in scratch
  using Tr = Traits<T>;
  using L = StageLayout<M_BLOCKS, WARPS>;
  static_assert(!SWAP || (M_BLOCKS == 1 && !SCALE_B), "swapped operands: one m16 block, fp32 scaling");
  constexpr int kWarps = WARPS;
  constexpr int kTileN = L::kTileN;
  extern __shared__ int4 smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int k_tiles = k / kTileK;
  const int n_strips = n / 64;
  const int n_blocks = (n + kTileN - 1) / kTileN;
  const WorkRange range = work_range(blockIdx.x, splits, tiles_per_cta, k_tiles, n_blocks * k_tiles);
  const int begin = range.w0, end = range.w1;  // this block's units
  const int n_words = n / 2;                   // 16-byte vectors per k16 row of qweight
  const bool group32 = !per_channel && group == 32;  // a tile spans two scale groups
  const int scale_rows = group32 ? 2 : 1;      // scale rows fetched per tile
  // Grouped scales: tile kt starts in group row kt * 64 / group; group sums are folded every fold_mask + 1 tiles.
  const int tiles_per_group = per_channel || group32 ? 1 : group / kTileK;
  const int group_mask = tiles_per_group - 1;  // 0 or 1 (tiles_per_group is 1 or 2): no division per tile
  // Per-channel scales: the sums are still folded every 128 k rows (fold_mask 1), as if the group were
  // 128: the offset dequantization's fp32 sums must not grow over the whole k range (at k = 8192 with
  // activations of mean 3 that cost 1.5e-3 relative error).
  const int fold_mask = per_channel ? 1 : group_mask;

  // Copy addresses. Each thread issues per tile: kStrips weight vectors of its warp's strip, at most one
  // activation vector (row a_row, 8 columns) and at most one scale vector; all advance incrementally.
  constexpr int kAPerThread = (L::kA + 32 * WARPS - 1) / (32 * WARPS);  // activation copies per thread
  static_assert(L::kA % (32 * WARPS) == 0 || kAPerThread == 1, "activation copies must tile the threads");
  const uint32_t sh_base = smem_addr(smem);
  constexpr uint32_t kStageBytes = 16 * L::kStage;
  const uint32_t b_dst = sh_base + 16 * ((warp * kStrips) * 32 + lane);
  const int a_chunk = tid % 8;
  const bool a_loader = tid < L::kA;
  bool a_valid[kAPerThread];
  const T* a_src[kAPerThread];
  uint32_t a_dst[kAPerThread];
#pragma unroll
  for (int r = 0; r < kAPerThread; ++r) {
    const int a_row = (tid + r * 32 * WARPS) / 8;
    a_valid[r] = a_loader && a_row < m;
    a_src[r] = a + static_cast<size_t>(a_valid[r] ? a_row : 0) * lda + a_chunk * 8;
    a_dst[r] = sh_base + 16 * (L::kB + a_row * 8 + (a_chunk ^ (a_row % 8)));
  }
  const bool s_loader = tid < scale_rows * (kTileN / 8);
  const int s_row = tid / (kTileN / 8), s_chunk = tid % (kTileN / 8);
  const uint32_t s_dst = sh_base + 16 * (L::kB + L::kA + s_row * (kTileN / 8) + s_chunk);
  const int tiles_shift = tiles_per_group == 2 ? 1 : 0;  // group 128: two tiles per scale row

  // Fetch cursor: the next unit (f_nb, f_kt) to copy and this thread's global source addresses for it,
  // advanced incrementally (recomputed only when the run moves to the next column block).
  const size_t b_tile_step = static_cast<size_t>(kStrips) * n_words;  // 16-byte vectors per k tile
  int f_nb = 0, f_kt = 0;
  bool f_b_ok = false, f_s_ok = false;
  const int4* f_b = qweight;  // this lane's first weight vector of the unit
  int f_a = 0;                // column offset of the unit in A
  const T* f_s_col = scales;  // this thread's scale column (row 0)
  auto scale_row = [&](int kt) { return per_channel ? 0 : (group32 ? 2 * kt + s_row : kt >> tiles_shift); };
  auto seek = [&](int nb, int kt) {
    f_nb = nb;
    f_kt = kt;
    const int strip = nb * kWarps + warp;
    f_b_ok = strip < n_strips;
    f_b = qweight + kt * b_tile_step + strip * 32 + lane;
    f_a = kt * kTileK;
    const int col = nb * kTileN + s_chunk * 8;
    f_s_ok = s_loader && col < n;
    f_s_col = scales + col;
  };
  // Copies of the cursor's unit into shared-memory stage `stage`: weights and scales, and the activations
  // at column offset a_col.
  auto fetch_weights = [&](int stage) {
    const uint32_t off = stage * kStageBytes;
    if (f_b_ok) {
#pragma unroll
      for (int i = 0; i < kStrips; ++i) cp_async16(b_dst + off + 16 * 32 * i, f_b + i * n_words);
    }
    if (f_s_ok) cp_async16(s_dst + off, f_s_col + static_cast<size_t>(scale_row(f_kt)) * n);
  };
  auto fetch_activations = [&](int stage, int a_col) {
    if (a_loader) {
#pragma unroll
      for (int r = 0; r < kAPerThread; ++r) {
        cp_async16_zfill(a_dst[r] + stage * kStageBytes, a_src[r] + a_col, a_valid[r]);
      }
    }
  };
  auto advance = [&]() {
    if (++f_kt == k_tiles) {
      seek(f_nb + 1, 0);
    } else {
      f_b += b_tile_step;
      f_a += kTileK;
    }
  };

  // Shared-memory read addresses (stage 0): this lane's weight vectors, its ldmatrix rows of A for each
  // k16 strip, and (SCALE_B) the 8 scales of its B-fragment column lane/4: grouped scales hold column
  // 8j + i at position 8i + j of each 64, so one 16-byte vector.
  const uint32_t b_src_sh = b_dst;
  const uint32_t s_src_sh = sh_base + 16 * (L::kB + L::kA + warp * 8 + lane / 4);
  uint32_t a_src_sh[M_BLOCKS][kStrips];
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
    for (int i = 0; i < kStrips; ++i) {
      const int row = b * 16 + (lane % 16);
      const int chunk = i * 2 + lane / 16;
      a_src_sh[b][i] = sh_base + 16 * (L::kB + row * 8 + (chunk ^ (row % 8)));
    }

  // SWAP: ldmatrix rows of A as B fragments: lanes 8q..8q+7 address rows 0..7 of 16-byte chunk 4p + q
  // (strip 2p + q/2, k half q%2) for strip pair p.
  uint32_t a_swap_sh[kStrips / 2];
#pragma unroll
  for (int p = 0; p < kStrips / 2; ++p) {
    const int row = lane % 8, chunk = 4 * p + lane / 8;
    a_swap_sh[p] = sh_base + 16 * (L::kB + row * 8 + (chunk ^ row));
  }
  float acc_t[4][4], grp_t[4][4];  // SWAP: running and group sums per 16x16 tile j
  float hi_t[4] = {0.f, 0.f, 0.f, 0.f};  // SWAP: the group's weight offset x activation sums (fold_group_t)
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_t[j][e] = grp_t[j][e] = 0.f;

  float acc[M_BLOCKS][8][4];  // running sum: [m16 block][n8 tile][mma C fragment]
  float grp[M_BLOCKS][8][4];  // sum over the current scale group, not yet scaled
  float hi[M_BLOCKS][4];      // the group's weight offset x activation sums (see fold_group)
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b) hi[b][0] = hi[b][1] = hi[b][2] = hi[b][3] = 0.f;
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[b][j][e] = grp[b][j][e] = 0.f;

  // Wait for the previous kernel in the stream (programmatic dependent launch): this block's launch and
  // address setup overlapped its tail, but any of the inputs may be its output.
  grid_dependency_wait();

  // Pipeline prologue: STAGES-1 units in flight.
  int f_left = end - begin;
  seek(begin / k_tiles, begin % k_tiles);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (f_left > 0) {
      fetch_weights(s);
      fetch_activations(s, f_a);
      advance();
      --f_left;
    }
    cp_async_commit();
  }

  int nb = begin / k_tiles, kt = begin - nb * k_tiles;  // unit being computed
  int stage = 0, f_stage = STAGES - 1;
  for (int x = begin; x < end; ++x) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (f_left > 0) {
      fetch_weights(f_stage);
      fetch_activations(f_stage, f_a);
      advance();
      --f_left;
    }
    cp_async_commit();
    if (++f_stage == STAGES) f_stage = 0;

    const uint32_t off = stage * kStageBytes;
    const int4* ss = smem + stage * L::kStage + L::kB + L::kA + warp * 8;  // warp's scales, group row 0
    const int strip = nb * kWarps + warp;
    const bool seg_end = kt == k_tiles - 1 || x == end - 1;
    if (SWAP && strip < n_strips) {
#pragma unroll
      for (int p = 0; p < kStrips / 2; ++p) {
        uint32_t at[4];  // B fragments (b0, b1) of strips 2p and 2p + 1
        ldmatrix_x4(at, a_swap_sh[p] + off);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int i = 2 * p + q;
          const uint4 bq = lds128(b_src_sh + off + 16 * 32 * i);
          const uint32_t words[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t w[4];
            Tr::dequant_offset(words[j], w);
            const uint32_t wa[4] = {w[0], w[2], w[1], w[3]};  // as the A operand: rows = columns 16j..16j+15
            Tr::mma(grp_t[j], wa, at[2 * q], at[2 * q + 1]);
          }
          if constexpr (Tr::kHasOffset) {
            // The offsets' share: an A operand of kLoOffset (k rows 0..7) and kHiOffset (k rows 8..15).
            const uint32_t off_a[4] = {Tr::kLoOffsetPair, Tr::kLoOffsetPair, Tr::kHiOffsetPair, Tr::kHiOffsetPair};
            Tr::mma(hi_t, off_a, at[2 * q], at[2 * q + 1]);
          }
          if (i == 1 && group32) fold_group_t<T>(acc_t, grp_t, hi_t, ss, false, lane);
        }
      }
      if (seg_end || ((kt + 1) & fold_mask) == 0) {
        fold_group_t<T>(acc_t, grp_t, hi_t, ss + (group32 ? kTileN / 8 : 0), per_channel, lane);
      }
      if (seg_end) {
        int first = 0, n_segs = 0;
        unit_blocks(nb, k_tiles, splits, tiles_per_cta, first, n_segs);
        const int seg = static_cast<int>(blockIdx.x) - first;
        finish_segment_t<T>(acc_t, c, scratch, m, n, strip, seg, n_segs == 1, max_segs, lane);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_t[j][e] = 0.f;
      }
    } else if (!SWAP && strip < n_strips) {
      uint32_t sw[2][4] = {};  // SCALE_B: this lane's column scales (8 n8 tiles) of the tile's group rows
      if (SCALE_B && !per_channel) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (r == 0 || group32) {
            const uint4 v = lds128(s_src_sh + off + r * 16 * (kTileN / 8));
            sw[r][0] = v.x, sw[r][1] = v.y, sw[r][2] = v.z, sw[r][3] = v.w;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kStrips; ++i) {
        const uint4 bq = lds128(b_src_sh + off + 16 * 32 * i);
        uint32_t af[M_BLOCKS][4];
#pragma unroll
        for (int b = 0; b < M_BLOCKS; ++b) ldmatrix_x4(af[b], a_src_sh[b][i] + off);
        const uint32_t words[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t bf[4];
          if constexpr (SCALE_B) {
            Tr::dequant(words[j], bf);
          } else {
            Tr::dequant_offset(words[j], bf);  // b0 (k rows 0..7) carry + kLoOffset, b1 + kHiOffset
          }
          if constexpr (SCALE_B) {
            if (!per_channel) {
              const uint32_t w = group32 && i >= 2 ? sw[1][j] : sw[0][j];  // scales of n8 tiles 2j, 2j+1
              const uint32_t s_lo = __byte_perm(w, w, 0x1010), s_hi = __byte_perm(w, w, 0x3232);
              bf[0] = Tr::mul(bf[0], s_lo);
              bf[1] = Tr::mul(bf[1], s_lo);
              bf[2] = Tr::mul(bf[2], s_hi);
              bf[3] = Tr::mul(bf[3], s_hi);
            }
#pragma unroll
            for (int b = 0; b < M_BLOCKS; ++b) {
              Tr::mma(acc[b][2 * j], af[b], bf[0], bf[1]);
              Tr::mma(acc[b][2 * j + 1], af[b], bf[2], bf[3]);
            }
          } else {
#pragma unroll
            for (int b = 0; b < M_BLOCKS; ++b) {
              Tr::mma(grp[b][2 * j], af[b], bf[0], bf[1]);
              Tr::mma(grp[b][2 * j + 1], af[b], bf[2], bf[3]);
            }
          }
        }
        if constexpr (!SCALE_B && Tr::kHasOffset) {
          // The offsets' share: a B operand of kLoOffset (k rows 0..7) and kHiOffset (k rows 8..15).
#pragma unroll
          for (int b = 0; b < M_BLOCKS; ++b) Tr::mma(hi[b], af[b], Tr::kLoOffsetPair, Tr::kHiOffsetPair);
        }
        if (!SCALE_B && i == 1 && group32) fold_group<T, M_BLOCKS>(acc, grp, hi, ss, false, lane);
      }
      if constexpr (SCALE_B) {
        if (seg_end && per_channel) scale_per_channel<T, M_BLOCKS>(acc, ss, lane);
      } else if (seg_end || ((kt + 1) & fold_mask) == 0) {
        // Fold the group sum when the next tile starts another group, or the segment ends.
        fold_group<T, M_BLOCKS>(acc, grp, hi, ss + (group32 ? kTileN / 8 : 0), per_channel, lane);
      }
      if (seg_end) {
        int first = 0, n_segs = 0;
        unit_blocks(nb, k_tiles, splits, tiles_per_cta, first, n_segs);
        const int seg = static_cast<int>(blockIdx.x) - first;
        finish_segment<T, M_BLOCKS>(acc, c, scratch, m, n, strip, seg, n_segs == 1, max_segs, lane);
#pragma unroll
        for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[b][j][e] = 0.f;
      }
    }
    if (++stage == STAGES) stage = 0;
    if (++kt == k_tiles) kt = 0, ++nb;
  }
  launch_dependents();
  cp_async_wait<0>();
}

// Launch configuration per number of m16 row blocks. Weights in flight per SM = blocks x (stages - 1)
// x warps x 2 KB; HBM needs roughly 3 TB/s x 2 us / 132 SMs = 45 KB per SM to stay busy.
// One row block fits in 124 registers: 4 blocks of 4 warps per SM (4 warps per scheduler to hide the
// dequantization latency; 256-column blocks so that small matrices need less split-k). Two row blocks
// need ~210 registers: 2 blocks of 4 warps per SM.
template <int M_BLOCKS>
struct Config;
template <>
struct Config<1> {
  static constexpr int kWarps = 4;
  static constexpr int kStages = 4;
  static constexpr int kBlocksPerSm = 4;
};
template <>
struct Config<2> {
  static constexpr int kWarps = 4;
  static constexpr int kStages = 4;
  static constexpr int kBlocksPerSm = 2;
};
// Four row blocks (fp16 only, scales applied to the weights in 16 bits): ~200 registers.
template <>
struct Config<4> {
  static constexpr int kWarps = 4;
  static constexpr int kStages = 4;
  static constexpr int kBlocksPerSm = 2;
};

// Largest number of blocks any configuration launches per SM, and the narrowest column block (both
// size the scratch buffer).
constexpr int kMaxBlocksPerSm = 4;
constexpr int kMinTileN = 256;
template <typename T, int M_BLOCKS, bool SCALE_B, bool SWAP = false>
int launch(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, int m, int n, int k,
           int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  using C = Config<M_BLOCKS>;
  auto kernel = gemm_kernel<T, M_BLOCKS, C::kWarps, C::kStages, C::kBlocksPerSm, SCALE_B, SWAP>;
  constexpr int smem = smem_bytes<M_BLOCKS, C::kWarps, C::kStages>();
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  const Plan plan = mma_plan(n, k, m, sms * C::kBlocksPerSm, 64 * C::kWarps);
  const int k_tiles = k / kTileK;
  const int max_segs = max_segments(plan, k_tiles);
  if (launch_kernel(kernel, plan.grid, 32 * C::kWarps, smem, stream, pdl, a, qweight, scales, c, scratch, m, n, k,
                    lda, group, per_channel, plan.tiles_per_block, plan.splits, max_segs) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  if (plan_cuts(plan, k_tiles)) {  // segments to add
    // Up to 16 segments per lane (one batch of loads in flight).
    const int lanes_log2 = max_segs > 32 ? 2 : max_segs > 16 ? 1 : 0;
    const int threads = 256, total_lanes = (m * (n / 2)) << lanes_log2;
    if (launch_kernel(reduce_kernel<T>, (total_lanes + threads - 1) / threads, threads, 0, stream, pdl,
                      static_cast<const float*>(scratch), c, m, n, k_tiles, plan.tiles_per_block, plan.splits,
                      C::kWarps, max_segs, lanes_log2) != cudaSuccess) {
      return MARLIN_ERR_LAUNCH;
    }
  }
  return MARLIN_OK;
}

// Instantiated configurations: {fp16, bf16} x {one m16 row block with swapped operands (m <= 8), one
// and two m16 row blocks} with fp32 group scaling, and fp16 x four row blocks with 16-bit weight scaling. Four row blocks with fp32 group sums would need 256
// accumulator registers; scaling the fp16 weights instead costs ~2e-4 relative error (within the 1e-3
// budget) but in bf16 ~2e-3, so bf16 stays at two row blocks. Larger m is processed 64 (fp16) or 32
// (bf16) rows per launch, re-reading the weights; the op switches to dequantize + cuBLAS for large m.
template <typename T>
int gemm_rows(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, int m, int n,
              int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  constexpr bool kFp16 = std::is_same<T, half>::value;
  constexpr int kRowsPerLaunch = kFp16 ? 64 : 32;
  for (int m0 = 0; m0 < m; m0 += kRowsPerLaunch) {
    const int rows = m - m0 < kRowsPerLaunch ? m - m0 : kRowsPerLaunch;
    const T* a_rows = a + static_cast<size_t>(m0) * lda;
    T* c_rows = c + static_cast<size_t>(m0) * n;
    int status;
    if (rows <= 8) {
      status = launch<T, 1, false, true>(a_rows, qweight, scales, c_rows, scratch, rows, n, k, lda, group, per_channel,
                                         sms, pdl, stream);
    } else if (rows <= 16) {
      status = launch<T, 1, false>(a_rows, qweight, scales, c_rows, scratch, rows, n, k, lda, group, per_channel, sms,
                                   pdl, stream);
    } else if (rows <= 32 || !kFp16) {
      status = launch<T, 2, false>(a_rows, qweight, scales, c_rows, scratch, rows, n, k, lda, group, per_channel, sms,
                                   pdl, stream);
    } else {
      status = launch<T, kFp16 ? 4 : 2, kFp16>(a_rows, qweight, scales, c_rows, scratch, rows, n, k, lda, group,
                                               per_channel, sms, pdl, stream);
    }
    if (status != MARLIN_OK) return status;
  }
  return MARLIN_OK;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace marlin

int marlin_check_weights(int n, int k, int group_size, int dtype) {
  if (k < 64 || k % 64 != 0) return MARLIN_ERR_K;
  if (n < 64 || n % 64 != 0) return MARLIN_ERR_N;
  const bool per_channel = group_size == -1;
  if (!(per_channel || group_size == 32 || group_size == 64 || group_size == 128) ||
      (!per_channel && k % group_size != 0)) {
    return MARLIN_ERR_GROUP;
  }
  if (dtype != MARLIN_FP16 && dtype != MARLIN_BF16) return MARLIN_ERR_DTYPE;
  return MARLIN_OK;
}

const char* marlin_status_string(int status) {
  switch (status) {
    case MARLIN_OK: return "ok";
    case MARLIN_ERR_M: return "m must be >= 1";
    case MARLIN_ERR_K: return "k must be a positive multiple of 64";
    case MARLIN_ERR_N: return "n must be a positive multiple of 64";
    case MARLIN_ERR_GROUP: return "group size must be 32, 64, 128 or -1 and divide k";
    case MARLIN_ERR_DTYPE: return "dtype must be float16 or bfloat16";
    case MARLIN_ERR_ALIGN: return "pointers must be 16-byte aligned and lda a multiple of 8 and >= k";
    case MARLIN_ERR_SCRATCH: return "scratch buffer too small";
    case MARLIN_ERR_SMS: return "sms must be >= 1";
    case MARLIN_ERR_LAUNCH: return "CUDA launch failed";
    case MARLIN_ERR_ARCH:
      return "the wgmma kernel needs a compute capability 9.0 GPU and an extension built for arch 9.0a";
    case MARLIN_ERR_KERNEL: return "kernel must be MARLIN_KERNEL_AUTO, _MMA or _WGMMA";
    default: return "unknown marlin status";
  }
}

size_t marlin_scratch_bytes(int m, int n, int k, int dtype, int sms) {
  if (n < 64 || k < 64 || sms < 1) return 0;
  // More blocks means more segments per column block: size for the largest grid, under either plan.
  const int ctas = sms * marlin::kMaxBlocksPerSm, k_tiles = k / marlin::kTileK;
  const int units = (n + marlin::kMinTileN - 1) / marlin::kMinTileN;
  const int sk = marlin::max_segments(
      marlin::stream_k_plan(units, k_tiles, ctas, marlin::mma_min_run(1, k_tiles)), k_tiles);
  const int sp = marlin::mma_splits(n, k, 1, ctas, marlin::kMinTileN);
  const size_t mma = static_cast<size_t>(n / 64) * (sk > sp ? sk : sp) * marlin::kMaxRows * 64 * sizeof(float);
  const size_t wgmma = marlin::sm90::compiled() && m >= 1 ? marlin::sm90::scratch_bytes(m, n, k, dtype, sms) : 0;
  return mma > wgmma ? mma : wgmma;
}

namespace marlin {

// Compute capability of `device`; false if the runtime cannot tell.
bool capability(int device, int& major, int& minor) {
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
}

// The wgmma kernel runs on compute capability 9.0 only, and only if this build holds its sm_90a code.
bool wgmma_runs(int major, int minor) { return sm90::compiled() && major == 9 && minor == 0; }

}  // namespace marlin

int marlin_wgmma_available(int device) {
  int major = 0, minor = 0;
  return marlin::capability(device, major, minor) && marlin::wgmma_runs(major, minor) ? 1 : 0;
}

int marlin_gemm(const void* a, const int32_t* qweight, const void* scales, void* c, float* scratch,
                size_t scratch_bytes, int m, int n, int k, int lda, int group_size, int dtype, int sms,
                int kernel, cudaStream_t stream) {
  if (m < 1) return MARLIN_ERR_M;
  const int weights = marlin_check_weights(n, k, group_size, dtype);
  if (weights != MARLIN_OK) return weights;
  const bool per_channel = group_size == -1;
  if (!marlin::aligned16(a) || !marlin::aligned16(qweight) || !marlin::aligned16(scales) ||
      !marlin::aligned16(c) || lda % 8 != 0 || lda < k) {
    return MARLIN_ERR_ALIGN;
  }
  if (sms < 1) return MARLIN_ERR_SMS;
  if (kernel != MARLIN_KERNEL_AUTO && kernel != MARLIN_KERNEL_MMA && kernel != MARLIN_KERNEL_WGMMA) {
    return MARLIN_ERR_KERNEL;
  }
  if (scratch_bytes < marlin_scratch_bytes(m, n, k, dtype, sms)) return MARLIN_ERR_SCRATCH;
  const int group = per_channel ? k : group_size;
  const int4* q = reinterpret_cast<const int4*>(qweight);
  int device = 0, cc_major = 0, cc_minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess || !marlin::capability(device, cc_major, cc_minor)) {
    return MARLIN_ERR_LAUNCH;
  }
  const bool pdl = cc_major >= 9;  // programmatic dependent launch
  const bool wgmma_ok = marlin::wgmma_runs(cc_major, cc_minor);
  if (kernel == MARLIN_KERNEL_WGMMA && !wgmma_ok) return MARLIN_ERR_ARCH;
  const bool auto_wgmma = kernel == MARLIN_KERNEL_AUTO && wgmma_ok && m >= marlin::wgmma_min_rows(dtype);
  if (kernel == MARLIN_KERNEL_WGMMA || auto_wgmma) {
    return marlin::sm90::gemm(a, q, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel ? 1 : 0,
                              dtype, sms, pdl, stream);
  }
  if (dtype == MARLIN_FP16) {
    return marlin::gemm_rows(static_cast<const half*>(a), q, static_cast<const half*>(scales), static_cast<half*>(c),
                             scratch, m, n, k, lda, group, per_channel ? 1 : 0, sms, pdl, stream);
  }
  return marlin::gemm_rows(static_cast<const __nv_bfloat16*>(a), q, static_cast<const __nv_bfloat16*>(scales),
                           static_cast<__nv_bfloat16*>(c), scratch, m, n, k, lda, group, per_channel ? 1 : 0,
                           sms, pdl, stream);
}
