// The Hopper (sm_90a) fused kernel: C[m, n] = A[m, k] @ dequant(B)[k, n] with warpgroup MMAs (wgmma),
// fp32 accumulation, for the larger batches where mma.sync cannot keep the tensor cores busy.
//
// Operands are swapped as in the small-m mma.sync kernel: each wgmma computes a 64 x MT slice of C^T =
// dequant(B)^T A^T. The dequantized weights are the A operand, straight from registers: warp w of a
// warpgroup unpacks, per k16 step, the 16 x 16 tile w of its warpgroup's 64-column strip, which the Marlin
// layout already hands each lane as an mma A fragment (one 32-bit word of its 16-byte vector). The
// activations (MT rows x 64 k per stage, 128-byte swizzled) are the B operand, read by the tensor cores from
// shared memory, so one wgmma covers 64 columns x MT rows x 16 k.
//
// A unit of work is MT rows (16, 32, 64, 128 or 256) x WG warpgroups' 64-column strips x all of k. A block
// runs one part of a unit (split plan) or a run of consecutive k tiles across units (stream-k plan; see
// marlin_plan.h). Weights, activations and scales flow through a STAGES-deep cp.async pipeline,
// fetched STAGES - 2 tiles ahead so that a stage is refilled only after the wgmmas that read it have
// completed: each warpgroup waits for its previous tile's wgmmas before it rewrites their A registers and
// issues the next tile's. fp16 applies the group scales to the dequantized weights (16-bit products, one
// fp32 accumulator set); bf16 keeps fp32 group sums apart from the running sum and folds them in with their
// fp32 scale at the end of each group, as the mma.sync kernels do. The fp32 sums of units that several blocks
// share go to scratch, and a second kernel adds them in block order (deterministic, no state kept between
// launches, graph-safe).
//
// fp16 with m > 32 (row tiles of 64, 128 and 256) runs the same consumers fed by a TMA producer warpgroup
// instead of the cp.async pipeline (wgmma_tma_kernel, marlin_wgmma_tma.cuh); fp16 at 16 and 32 rows (taken
// only when the wgmma kernel is asked for: the automatic choice runs mma.sync there) and bf16 run the
// cp.async kernel below.
#include "marlin_kernel.h"
#include "marlin_launch.cuh"
#include "marlin_layout.cuh"
#include "marlin_plan.h"
#include "marlin_ptx.cuh"
#include "marlin_sm90.h"
#include "marlin_tma.cuh"
#include "marlin_wgmma.cuh"
#include "marlin_wgmma_tma.cuh"

namespace marlin {
namespace sm90 {

// Bytes of one pipeline stage for MT rows and WG warpgroups (64-column strips). The activations come
// first: stage strides are multiples of 1024 bytes, as the 128-byte swizzle atoms of the wgmma B operand need.
template <int MT, int WG>
struct Layout {
  static constexpr int kA = MT * 128;          // activations: MT rows x 64 k (16-bit), swizzled
  static constexpr int kB = WG * 4 * 512;      // weights: [strip][k16 step][lane] 16-byte vectors
  static constexpr int kS = 2 * (64 * WG) * 2; // scales: up to two group rows x the block's columns
  static constexpr int kStage = (kA + kB + kS + 1023) / 1024 * 1024;
};

// Launch configurations, chosen by pick():
//  - fp16, MT = 16..128: four warpgroups (256 columns per block, so each activation tile feeds twice the
//    weights; two warpgroups with 2-3 blocks per SM measured 5-31% slower in the per-model sums), scales
//    applied to the dequantized weights in fp16 (one fp32 accumulator set: ~2e-4 relative error, like the
//    mma.sync kernel's 4-row-block variant); one block per SM. MT = 16 and 32: this cp.async kernel, 8 stages
//    of 512 threads (6 tiles in flight; 12 stages measured 0.5-2% slower); MT = 64 and 128: the TMA kernel
//    (marlin_wgmma_tma.cuh), 8 stages, a fifth (producer) warpgroup.
//  - fp16, m > 128: MT = 256 (m64n256k16 wgmmas, 128 accumulators per thread) with two consumer warpgroups
//    in the TMA kernel, 6 stages (37 KB each), one block per SM: 2-11% faster than MT = 128 at m = 256 and
//    512 (measured on the H200 with this kernel's cp.async pipeline).
//  - bf16 (and any dtype with SCALE_A false): this kernel with two warpgroups and fp32 group sums folded in
//    with fp32 scales (rounding the scaled weights to bf16 would cost ~2e-3); MT = 64: two blocks per SM
//    (128 registers), MT = 128: one (~215).
// Blocks per SM of a configuration (register and shared-memory budget): two only for 64 rows x 2 warpgroups.
constexpr int blocks_per_sm(int mt, int wg) { return wg == 2 && mt == 64 ? 2 : 1; }

template <int MT, int WG, int STAGES>
struct Config {
  static constexpr int kStages = STAGES;
  static constexpr int kBlocksPerSm = blocks_per_sm(MT, WG);
  static constexpr int kSmem = kStages * Layout<MT, WG>::kStage;
};

template <typename T,     // half or __nv_bfloat16: element type of A, scales and C
          int MT,         // rows per block (the wgmma N): 16, 32, 64, 128 or 256
          int WG,         // warpgroups per block, one 64-column strip each: 2 or 4
          bool SCALE_A,   // true: scale the dequantized weights in 16 bits (fp16); false: fp32 group fold
          int STAGES,     // cp.async pipeline depth in 64-row k tiles
          int MIN_BLOCKS> // blocks per SM the register allocation must allow
__global__ void __launch_bounds__(128 * WG, MIN_BLOCKS)
    wgmma_kernel(const T* __restrict__ a,           // [m, lda] activations (first k columns used)
                 const int4* __restrict__ qweight,  // [k/16, n/2] packed codes as 16-byte vectors
                 const T* __restrict__ scales,      // [k/group, n] or [1, n], Marlin-permuted columns
                 T* __restrict__ c,                 // [m, n] output
                 float* __restrict__ scratch,       // [grid, 2, MT, 64 * WG] fp32 partial sums
                 int m,                             // rows of A and C
                 int n,                             // columns of C, multiple of 64
                 int k,                             // depth, multiple of 64
                 int lda,                           // row stride of A in elements
                 int group,                         // rows per scale group: 32, 64, 128, or k per channel
                 int per_channel,                   // 1: scales use the per-channel permutation
                 int m_tiles,                       // row tiles: ceil(m / MT)
                 int splits,                        // split plan: k parts per unit; 0: stream-k plan
                 int tiles_per_block) {             // stream-k plan: k tiles of work per block
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = Traits<T>;
  using L = Layout<MT, WG>;
  constexpr int kThreads = 128 * WG;
  constexpr int kTileN = 64 * WG;
  constexpr int kAcc = MT / 2;  // accumulator registers per thread
  extern __shared__ __align__(1024) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = (tid >> 5) & 3;  // warp within its warpgroup = 16x16 tile of the strip it dequantizes
  const int wg = tid >> 7;          // warpgroup = strip of the column block
  const int k_tiles = k / kTileK;
  const int n_strips = n / 64;
  const int n_words = n / 2;  // 16-byte vectors per k16 row of qweight
  // Work: unit u = (row tile u % m_tiles, column block u / m_tiles), row tile fastest so that the blocks
  // reading the same weights run together; work item w = u * k_tiles + k tile. This block runs w0..w1-1:
  // part blockIdx % splits of unit blockIdx / splits (split plan), or a run of tiles_per_block (stream-k).
  const WorkRange range = work_range(blockIdx.x, splits, tiles_per_block, k_tiles,
                                     m_tiles * ((n + kTileN - 1) / kTileN) * k_tiles);
  const int w0 = range.w0, w1 = range.w1;
  const int first_unit = w0 / k_tiles;
  const bool group32 = !per_channel && group == 32;
  const int tiles_per_group = per_channel ? k_tiles : (group32 ? 1 : group / kTileK);
  // Scale row of k row `row`: row >> log2(group) (group is 32, 64 or 128), or 0 per channel (shift 31).
  const int group_shift = per_channel ? 31 : __ffs(group) - 1;

  // Copies per stage: activation chunks (MT rows x 8 chunks of 16 bytes), one weight vector per thread
  // (warpgroup wg copies its own strip: k16 step `warp`, lane `lane`), and the scale rows. The fetch cursor
  // (f_u, f_kt) keeps running source pointers, advanced by one k tile per fetch and reset when it moves to
  // the next unit, so that a fetch costs about four instructions per 16-byte copy (ncu at m = 256: the
  // per-copy address arithmetic had been ~45% of the kernel's stall samples).
  constexpr int kActPerThread = (MT * 8 + kThreads - 1) / kThreads;
  static_assert(MT * 8 % kThreads == 0 || kActPerThread == 1, "activation copies must tile the threads");
  constexpr int kActRowStep = kThreads / 8;  // rows between a thread's chunks (a multiple of 8)
  constexpr int kScaleVecs = kTileN / 8;     // 16-byte scale vectors per group row
  const uint32_t sh = smem_addr(smem);
  // Activation chunk r of this thread: row tid / 8 + r kActRowStep, 16-byte chunk tid % 8, at the same
  // swizzled place in every 8-row group (kActRowStep is a multiple of 8): a_dst0 + r kActRowStep 128.
  const int a_row0 = tid >> 3, a_chunk = tid & 7;
  const uint32_t a_dst0 = static_cast<uint32_t>(a_row0 * 128 + ((a_chunk ^ (a_row0 & 7)) << 4));
  auto a_cp = [&](int r) { return tid + r * kThreads < MT * 8; };
  // Rows past m are not copied: their stale shared-memory values only reach output rows that are never
  // stored (each output row depends on its own activation row alone).
  const T* a_src[kActPerThread];
  uint32_t a_mask = 0;  // bit r: chunk r is copied
  const int4* b_src = qweight;
  int b_bytes = 0;  // 16, or 0 past the last strip (zero-filled: the warpgroup computes on it uniformly)
  bool s_ok = false;
  const T* s_src = scales;
  const uint32_t b_dst = L::kA + tid * 16;
  const int s_r = tid / kScaleVecs, s_chunk = tid % kScaleVecs;
  const bool s_cp = tid < (group32 ? 2 : 1) * kScaleVecs;
  const uint32_t s_dst = L::kA + L::kB + s_r * (kTileN * 2) + s_chunk * 16;
  int f_u = first_unit, f_kt = w0 - first_unit * k_tiles;
  auto seek = [&](int u, int kt) {  // the fetch cursor to k tile kt of unit u
    const int m0 = (u % m_tiles) * MT, nb = u / m_tiles;
    a_mask = 0;
#pragma unroll
    for (int r = 0; r < kActPerThread; ++r) {
      const int row = m0 + a_row0 + r * kActRowStep;
      const bool ok = a_cp(r) && row < m;
      a_mask |= static_cast<uint32_t>(ok) << r;
      a_src[r] = a + static_cast<size_t>(ok ? row : 0) * lda + a_chunk * 8 + kt * kTileK;
    }
    const int strip = nb * WG + wg;
    b_bytes = strip < n_strips ? 16 : 0;
    b_src = qweight + static_cast<size_t>(kt * 4 + warp) * n_words + (b_bytes ? strip : 0) * 32 + lane;
    s_ok = s_cp && nb * kTileN + s_chunk * 8 < n;
    s_src = scales + nb * kTileN + s_chunk * 8;
  };
  auto fetch = [&](int stage) {
    const uint32_t base = sh + stage * L::kStage;
#pragma unroll
    for (int r = 0; r < kActPerThread; ++r) {
      if ((a_mask >> r) & 1u) cp_async16(base + a_dst0 + r * kActRowStep * 128, a_src[r]);
      a_src[r] += kTileK;
    }
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(base + b_dst), "l"(b_src), "r"(b_bytes));
    b_src += 4 * n_words;
    if (s_ok) {
      const int row = (f_kt * kTileK + 32 * s_r) >> group_shift;
      cp_async16(base + s_dst, s_src + static_cast<size_t>(row) * n);
    }
    if (++f_kt == k_tiles) f_kt = 0, seek(++f_u, 0);
  };

  // This thread's A-fragment word of k16 step i: strip wg, step i, lane, word `warp` (+ 512 i bytes).
  const uint32_t w_off = L::kA + ((wg * 4 * 32) + lane) * 16 + warp * 4;
  // Scales of this thread's two rows of C^T: columns 16 warp + lane/4 (+8) of the strip.
  const int col0 = 16 * warp + (lane >> 2);
  const uint32_t s_off0 = L::kA + L::kB + 2 * (wg * 64 + scale_pos(col0, per_channel != 0));
  const uint32_t s_off1 = L::kA + L::kB + 2 * (wg * 64 + scale_pos(col0 + 8, per_channel != 0));
  auto load_scales = [&](int stage, int r, uint16_t& h0, uint16_t& h1) {
    const uint32_t base = sh + stage * L::kStage + r * (kTileN * 2);
    h0 = lds16(base + s_off0);
    h1 = lds16(base + s_off1);
  };

  // SCALE_A: the wgmmas accumulate into acc; else into the group sum grp, folded into acc per group.
  float acc[kAcc], grp[kAcc];  // (grp unused, and optimized away, with SCALE_A)
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = grp[i] = 0.f;
  auto mma = [&](const uint32_t(&af)[4], uint64_t desc, int scale_d) {
    if constexpr (SCALE_A) {
      wgmma_m64k16<T, MT>(acc, af, desc, scale_d);
    } else {
      wgmma_m64k16<T, MT>(grp, af, desc, scale_d);
    }
  };
  auto fence_d = [&]() {
    if constexpr (SCALE_A) {
      fence_registers(acc);
    } else {
      fence_registers(grp);
    }
  };
  // acc (+)= scale * src with the scales of group row r held in pipeline stage `stage`. Element 4q + 2h + e
  // is row 16 warp + lane/4 + 8h of C^T.
  auto fold = [&](int stage, int r, const float(&src)[kAcc]) {
    uint16_t h0, h1;
    load_scales(stage, r, h0, h1);
    const float s0 = Tr::to_float(*reinterpret_cast<const T*>(&h0));
    const float s1 = Tr::to_float(*reinterpret_cast<const T*>(&h1));
#pragma unroll
    for (int q = 0; q < kAcc / 4; ++q) {
      if constexpr (SCALE_A) {
        acc[4 * q + 0] = s0 * src[4 * q + 0];
        acc[4 * q + 1] = s0 * src[4 * q + 1];
        acc[4 * q + 2] = s1 * src[4 * q + 2];
        acc[4 * q + 3] = s1 * src[4 * q + 3];
      } else {
        acc[4 * q + 0] += s0 * src[4 * q + 0];
        acc[4 * q + 1] += s0 * src[4 * q + 1];
        acc[4 * q + 2] += s1 * src[4 * q + 2];
        acc[4 * q + 3] += s1 * src[4 * q + 3];
      }
    }
  };
  // End of this block's segment of unit u: the sum goes to C if the segment is the whole unit, else to this
  // block's scratch slot (0: its first unit, 1: its last).
  auto store = [&](int u, bool whole) {
    const int strip = (u / m_tiles) * WG + wg;
    if (strip >= n_strips) return;  // uniform over the warpgroup
    // Element 4q + 2h + e of acc: column strip*64 + col0 + 8h, row m0 + 8q + 2(lane%4) + e.
    const int m0 = (u % m_tiles) * MT;
    const int row0 = 2 * (lane & 3);
    float* slot = scratch + (static_cast<size_t>(blockIdx.x) * 2 + (u == first_unit ? 0 : 1)) * (MT * kTileN);
#pragma unroll
    for (int q = 0; q < kAcc / 4; ++q)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = row0 + 8 * q + e;
        if (m0 + r < m) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float v = acc[4 * q + 2 * h + e];
            if (whole) {
              c[static_cast<size_t>(m0 + r) * n + strip * 64 + col0 + 8 * h] = Tr::from_float(v);
            } else {
              slot[r * kTileN + wg * 64 + col0 + 8 * h] = v;
            }
          }
        }
      }
  };

  grid_dependency_wait();  // any input may be the previous kernel's output

  // Tiles fetched ahead: tile t's stage is refilled at iteration t + 2, after the barrier that follows every
  // warpgroup's wait for tile t's wgmmas (at t + 1).
  constexpr int kAhead = STAGES - 2;
  seek(f_u, f_kt);
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (w0 + s < w1) fetch(s);
    cp_async_commit();
  }

  int stage = 0, f_stage = kAhead;
  int u = first_unit, kt = w0 - first_unit * k_tiles;  // the unit and k tile being computed
  int pend_stage = 0, pend_r = 0;  // !SCALE_A: where the scales of the group in grp are
  // One segment (this block's k tiles of unit u) per pass of the outer loop; the fetch cursor runs on
  // across segments, so the pipeline never drains between them.
  for (int w = w0; w < w1; ++u) {
    const int seg_kt0 = kt;
    const int seg_w1 = min(w1, (u + 1) * k_tiles);
    bool pending = false;  // !SCALE_A: grp holds a finished group not yet folded
    bool fresh = true;     // the next wgmma starts a new sum (scale-d = 0)
    for (; w < seg_w1; ++w, ++kt) {
      cp_async_wait<kAhead - 1>();
      fence_proxy_async_shared();
      __syncthreads();  // tile w visible to all; every warpgroup is done with tile w - 2's stage
      if (w + kAhead < w1) fetch(f_stage);
      cp_async_commit();
      if (++f_stage == STAGES) f_stage = 0;

      // Every warpgroup runs this, also an inactive one: ptxas serializes wgmmas in divergent code.
      const uint32_t base = sh + stage * L::kStage;
      uint32_t wq[4][4];  // dequantized q - 8 pairs, one set per k16 step
      // SCALE_A: 16-bit pairs (s, s) of this thread's rows g and g + 8, for the tile's group rows 0 and 1.
      uint32_t s0p = 0, s1p = 0, s0q = 0, s1q = 0;
      // Tile w - 1's wgmmas must be done before their A registers are rewritten (reading registers an
      // in-flight wgmma reads is undefined) and before a fold. (Keeping one tile's wgmmas in flight with
      // double-buffered A registers measured no faster on the H200.)
      wgmma_wait<0>();
      fence_d();
      if (!SCALE_A && pending) {
        fold(pend_stage, pend_r, grp);
        fresh = true;
      }
      // The weights are loaded, dequantized and scaled after the wait (the registers of these configurations
      // leave no room to do it early, as the TMA kernel does at 256 rows).
#pragma unroll
      for (int i = 0; i < 4; ++i) Tr::dequant(lds32(base + w_off + 512 * i), wq[i]);
      if (SCALE_A && !per_channel) {
        uint16_t h0, h1;
        load_scales(stage, 0, h0, h1);
        s0p = h0 * 0x10001u, s1p = h1 * 0x10001u;
        if (group32) {
          load_scales(stage, 1, h0, h1);
          s0q = h0 * 0x10001u, s1q = h1 * 0x10001u;
        }
      }
      uint32_t af[4][4];  // this tile's A fragments, one per k16 step
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (SCALE_A && !per_channel) {
          const bool second = group32 && i >= 2;
          const uint32_t s0 = second ? s0q : s0p, s1 = second ? s1q : s1p;
          af[i][0] = Tr::mul(wq[i][0], s0), af[i][1] = Tr::mul(wq[i][2], s1);
          af[i][2] = Tr::mul(wq[i][1], s0), af[i][3] = Tr::mul(wq[i][3], s1);
        } else {
          af[i][0] = wq[i][0], af[i][1] = wq[i][2], af[i][2] = wq[i][1], af[i][3] = wq[i][3];
        }
      }
      const uint64_t desc = smem_desc_k128(base);  // + 2 per k16 step (32 bytes, in 16-byte units)
      wgmma_fence();
      if (!SCALE_A && group32) {
        mma(af[0], desc, 0);
        mma(af[1], desc + 2, 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_d();
        fold(stage, 0, grp);
        wgmma_fence();
        mma(af[2], desc + 4, 0);
        mma(af[3], desc + 6, 1);
        wgmma_commit();
        pending = true;
        pend_r = 1;
      } else {
        mma(af[0], desc, fresh ? 0 : 1);
        mma(af[1], desc + 2, 1);
        mma(af[2], desc + 4, 1);
        mma(af[3], desc + 6, 1);
        wgmma_commit();
        pending = (kt + 1) % tiles_per_group == 0;
        pend_r = 0;
      }
      fence_d();
      pend_stage = stage;
      fresh = false;
      if (++stage == STAGES) stage = 0;
    }
    // The segment's end: its sum goes to C (the whole unit) or to this block's scratch slot.
    if (w == w1) {
      cp_async_wait<0>();
      launch_dependents();
    }
    wgmma_wait<0>();
    fence_d();
    if constexpr (SCALE_A) {
      if (per_channel) fold(pend_stage, 0, acc);  // acc = scale * acc (any stage holds row 0)
    } else {
      fold(pend_stage, pend_r, grp);  // the last group (complete or cut by the segment's end)
    }
    store(u, seg_kt0 == 0 && kt == k_tiles);
    if constexpr (!SCALE_A) {  // (SCALE_A: the next segment's first wgmma overwrites acc)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
    }
    kt = 0;
  }
#else
  __trap();  // launched only when compiled() (sm_90a code present)
#endif
}

// C over the units that more than one block worked on: the sum of their blocks' segments in block order
// (deterministic: the order depends only on the plan). Four columns per thread, rows blockIdx.y + i gridDim.y.
template <typename T>
__global__ void sum_segments_kernel(const float* __restrict__ scratch,  // [grid, 2, mt, tile_n] segment sums
                                    T* __restrict__ c,                  // [m, n] output
                                    int m,                              // rows
                                    int n,                              // columns, multiple of 64
                                    int mt,                             // rows per unit (the kernel's MT)
                                    int tile_n,                         // columns per unit (64 x WG)
                                    int m_tiles,                        // row tiles: ceil(m / mt)
                                    int k_tiles,                        // k / 64
                                    int splits,                         // the gemm launch's split plan, or 0
                                    int tiles_per_block) {              // its stream-k run
  using T2 = typename Traits<T>::T2;
  grid_dependency_wait();  // the gemm kernel's segment sums
  launch_dependents();
  const int col = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (col >= n) return;
  const int nb = col / tile_n;
  const size_t slot_size = static_cast<size_t>(mt) * tile_n;
  for (int row = blockIdx.y; row < m; row += gridDim.y) {
    const int u = nb * m_tiles + row / mt, w_first = u * k_tiles;  // the unit and its first work item
    int b0 = 0, count = 0;
    unit_blocks(u, k_tiles, splits, tiles_per_block, b0, count);
    if (count == 1) continue;  // one block ran the whole unit and wrote C
    const int b1 = b0 + count - 1;
    // Block b holds the unit in slot 0 if the unit is its first (b starts inside it), else in slot 1
    // (split plan: always its first).
    const float* src = scratch + (row % mt) * tile_n + (col - nb * tile_n);
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int b = b0; b <= b1; ++b) {
      const int slot = splits > 0 || b * tiles_per_block >= w_first ? 0 : 1;
      const float4 v = __ldcg(reinterpret_cast<const float4*>(src + (static_cast<size_t>(b) * 2 + slot) * slot_size));
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    T* out = c + static_cast<size_t>(row) * n + col;
    reinterpret_cast<T2*>(out)[0] = Traits<T>::pack2(s.x, s.y);
    reinterpret_cast<T2*>(out)[1] = Traits<T>::pack2(s.z, s.w);
  }
}

// The configuration a call with m rows of dtype runs: rows per block and warpgroups (64-column strips) per
// block. fp16: the smallest of 16, 32, 64, 128 rows that covers m with four warpgroups, above 128 rows 256 with
// two; bf16: 64 or 128 rows with two.
void pick(int m, int dtype, int& mt, int& wg) {
  const bool fp16 = dtype == MARLIN_FP16;
  mt = fp16 && m <= 16 ? 16 : fp16 && m <= 32 ? 32 : m <= 64 ? 64 : fp16 && m > 128 ? 256 : 128;
  wg = fp16 && mt <= 128 ? 4 : 2;
}

// Every configuration of pick() runs one block per SM except bf16's 64 rows x 2 warpgroups (two).
Plan plan_for(int m, int n, int k, int mt, int wg, int sms) {
  return wgmma_plan(m, n, k, mt, wg, sms * blocks_per_sm(mt, wg));
}

size_t plan_scratch_bytes(const Plan& p, int k, int mt, int wg) {
  return plan_cuts(p, k / kTileK) ? static_cast<size_t>(p.grid) * 2 * mt * 64 * wg * sizeof(float) : 0;
}

// The segment sums of the units that several blocks shared, when the plan cut any.
template <typename T>
int launch_sum(const Plan& p, float* scratch, T* c, int m, int n, int k, int mt, int wg, bool pdl,
               cudaStream_t stream) {
  if (!plan_cuts(p, k / kTileK)) return MARLIN_OK;
  const int threads = 128;
  const dim3 grid((n / 4 + threads - 1) / threads, m < 65535 ? m : 65535);
  return launch_kernel(sum_segments_kernel<T>, grid, threads, 0, stream, pdl, static_cast<const float*>(scratch), c, m,
                       n, mt, 64 * wg, (m + mt - 1) / mt, k / kTileK, p.splits, p.tiles_per_block) == cudaSuccess
             ? MARLIN_OK
             : MARLIN_ERR_LAUNCH;
}

// The cp.async kernel (fp16 at MT = 16 and 32, bf16).
template <typename T, int MT, int WG, bool SCALE_A, int STAGES>
int launch(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, size_t scratch_bytes, int m, int n,
           int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  using C = Config<MT, WG, STAGES>;
  auto kernel = wgmma_kernel<T, MT, WG, SCALE_A, C::kStages, C::kBlocksPerSm>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  const Plan p = plan_for(m, n, k, MT, WG, sms);
  if (plan_scratch_bytes(p, k, MT, WG) > scratch_bytes) return MARLIN_ERR_SCRATCH;
  if (launch_kernel(kernel, p.grid, 128 * WG, C::kSmem, stream, pdl, a, qweight, scales, c, scratch, m, n, k, lda,
                    group, per_channel, (m + MT - 1) / MT, p.splits, p.tiles_per_block) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  return launch_sum(p, scratch, c, m, n, k, MT, WG, pdl, stream);
}

// The TMA kernel (fp16, MT = 64, 128, 256). Its tensor maps are encoded on the host for each call (in a CUDA
// graph, once at capture); they need A, the codes and the scales 16-byte aligned and lda % 8 == 0, which
// marlin_gemm checks of every call.
template <int MT, int WG, int STAGES>
int launch_tma(const half* a, const int4* qweight, const half* scales, half* c, float* scratch, size_t scratch_bytes,
               int m, int n, int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  using C = TmaConfig<MT, WG, STAGES>;
  auto kernel = wgmma_tma_kernel<MT, WG, STAGES>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  const bool group32 = !per_channel && group == 32;
  CUtensorMap tm_a, tm_b, tm_s;
  // Codes as 8-byte words: a k16 row of qweight (n / 2 16-byte vectors) is n words.
  if (!encode_2d(&tm_a, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, a, k, m, static_cast<uint64_t>(lda) * 2, kTileK, MT,
                 CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode_2d(&tm_b, CU_TENSOR_MAP_DATA_TYPE_UINT64, qweight, n, k / 16, static_cast<uint64_t>(n) * 8, 64 * WG, 4,
                 CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !encode_2d(&tm_s, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, scales, n, per_channel ? 1 : k / group,
                 static_cast<uint64_t>(n) * 2, 64 * WG, group32 ? 2 : 1, CU_TENSOR_MAP_SWIZZLE_NONE)) {
    return MARLIN_ERR_LAUNCH;
  }
  const Plan p = plan_for(m, n, k, MT, WG, sms);
  if (plan_scratch_bytes(p, k, MT, WG) > scratch_bytes) return MARLIN_ERR_SCRATCH;
  if (launch_kernel(kernel, p.grid, C::kThreads, C::kSmem, stream, pdl, tm_a, tm_b, tm_s, c, scratch, m, n, k, group,
                    per_channel, (m + MT - 1) / MT, p.splits, p.tiles_per_block) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  return launch_sum(p, scratch, c, m, n, k, MT, WG, pdl, stream);
}

bool compiled() {
#if defined(MARLIN_SM90A)
  return true;
#else
  return false;
#endif
}

size_t scratch_bytes(int m, int n, int k, int dtype, int sms) {
  int mt = 0, wg = 0;
  pick(m, dtype, mt, wg);
  return plan_scratch_bytes(plan_for(m, n, k, mt, wg, sms), k, mt, wg);
}

int gemm(const void* a, const int4* qweight, const void* scales, void* c, float* scratch, size_t scratch_bytes, int m,
         int n, int k, int lda, int group, int per_channel, int dtype, int sms, bool pdl, cudaStream_t stream) {
  if (!compiled()) return MARLIN_ERR_ARCH;
  int mt = 0, wg = 0;
  pick(m, dtype, mt, wg);
  if (dtype == MARLIN_FP16) {
    const half* a16 = static_cast<const half*>(a);
    const half* s16 = static_cast<const half*>(scales);
    half* c16 = static_cast<half*>(c);
    switch (mt) {
      case 16:
        return launch<half, 16, 4, true, 8>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group,
                                            per_channel, sms, pdl, stream);
      case 32:
        return launch<half, 32, 4, true, 8>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group,
                                            per_channel, sms, pdl, stream);
      case 64:
        return launch_tma<64, 4, 8>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group, per_channel,
                                    sms, pdl, stream);
      case 128:
        return launch_tma<128, 4, 8>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group,
                                     per_channel, sms, pdl, stream);
      default:
        return launch_tma<256, 2, 6>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group,
                                     per_channel, sms, pdl, stream);
    }
  }
  const __nv_bfloat16* ab = static_cast<const __nv_bfloat16*>(a);
  const __nv_bfloat16* sb = static_cast<const __nv_bfloat16*>(scales);
  __nv_bfloat16* cb = static_cast<__nv_bfloat16*>(c);
  return mt == 64 ? launch<__nv_bfloat16, 64, 2, false, 8>(ab, qweight, sb, cb, scratch, scratch_bytes, m, n, k, lda,
                                                           group, per_channel, sms, pdl, stream)
                  : launch<__nv_bfloat16, 128, 2, false, 8>(ab, qweight, sb, cb, scratch, scratch_bytes, m, n, k, lda,
                                                            group, per_channel, sms, pdl, stream);
}

}  // namespace sm90
}  // namespace marlin
