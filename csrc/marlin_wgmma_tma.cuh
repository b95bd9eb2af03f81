// The Hopper (sm_90a) fused kernel: C[m, n] = A[m, k] @ dequant(B)[k, n] with warpgroup MMAs (wgmma) fed by a
// TMA producer warpgroup, fp32 accumulation, for the batches where mma.sync cannot keep the tensor cores busy
// (included by marlin_wgmma.cu, which launches it).
//
// Operands are swapped as in the small-m mma.sync kernel: each wgmma computes a 64 x MT slice of C^T =
// dequant(B)^T A^T. The dequantized weights are the A operand, straight from registers: warp w of a consumer
// warpgroup unpacks, per k16 step, the 16 x 16 tile w of its warpgroup's 64-column strip, which the Marlin
// layout already hands each lane as an mma A fragment (one 32-bit word of its 16-byte vector). The
// activations (MT rows x 64 k per stage, 128-byte swizzled) are the B operand, read by the tensor cores from
// shared memory, so one wgmma covers 64 columns x MT rows x 16 k.
//
// A unit of work is MT rows (16, 32, 64, 128 or 256) x WG warpgroups' 64-column strips x all of k. A block of
// the plan (marlin_plan.h) runs one part of a unit (split plan: a part or the whole unit) or a run of consecutive
// k tiles across units (stream-k plan); the fp32 sums of units that several blocks share
// go to scratch, and a second kernel adds them in block order (deterministic, no state kept between launches,
// graph-safe). At most one block per SM is launched; each runs the plan's blocks blockIdx.x, + gridDim.x, ... in
// turn, its producer filling the stages of the next while the consumers finish the last.
//  - A whole unit's sums go to C through a small buffer per consumer warp (stmatrix, then 32-byte row pieces:
//    store_unit); parts of units go to the block's scratch slots (store_partial).
//  - One extra warpgroup, the producer, gives its registers to the consumers (setmaxnreg) and has one thread
//    issue three tensor copies per 64-k tile (cp.async.bulk.tensor): the activations (box 64 k x MT rows,
//    128-byte swizzle: the layout the wgmma B descriptor reads; rows past m come back as zeros), the codes
//    (box of 4 k16 rows x the block's 64 WG 8-byte words, stored step-major: [k16 step][strip][lane]) and the
//    scale rows (box of 64 WG columns x 1 or 2 group rows); columns past n come back as zeros.
//  - full[s] (one arrival with the stage's byte count, completed by the copies) hands a stage to the
//    consumers; empty[s] (one arrival per consumer warp, once the wgmmas that read the stage are complete)
//    lets the producer refill it: STAGES - 1 tiles in flight, and no warpgroup waits for another.
//  - Each consumer warpgroup waits for its previous tile's wgmmas before it rewrites their A registers and
//    issues the next tile's. fp16 applies the group scales to the dequantized weights (16-bit products).
//    bf16 cannot (rounding the scaled weights to bf16 would cost ~2e-3 relative error): up to 128 rows it
//    keeps fp32 group sums apart and folds them in with their scales (two accumulator sets); at 256 rows its
//    one accumulator set holds the running sum divided by the current group's scales, rescaled where a group
//    ends (see kFold and kRescale below).
// Measured on an H100 against the cp.async-fed kernel it replaced (docs/kernel.md): fp16 (round 6, A/B in one
// run, bit-identical outputs) 12% faster on the Llama-2-7B layers and 16-18% on 70B at m = 64-128, 3-5% at
// m = 256-512; bf16 (round 7, tables of two leases) 11-16% faster at m = 128-1024.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only; the maps are encoded on the host)
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "marlin_layout.cuh"
#include "marlin_ptx.cuh"
#include "marlin_tma.cuh"
#include "marlin_wgmma.cuh"

namespace marlin {
namespace sm90 {

// Shared memory of one stage: activations, codes (step-major), scales; stage strides are multiples of 1024
// bytes, as the 128-byte swizzle atoms of the wgmma B operand need.
template <int MT, int WG>
struct TmaLayout {
  static constexpr int kA = MT * 128;           // activations: MT rows x 64 k, 128-byte swizzle (TMA)
  static constexpr int kB = WG * 4 * 512;       // codes: [k16 step][strip][lane] 16-byte vectors
  static constexpr int kS = 2 * (64 * WG) * 2;  // scales: up to two group rows x the block's columns
  static constexpr int kStage = (kA + kB + kS + 1023) / 1024 * 1024;
};

// Threads, shared memory and registers. Warps are spread over the SM's four schedulers, each with a quarter of
// the register file (16K registers), so a block of WG + 1 warpgroups gets kLaunch registers per thread at
// launch (a lone producer warp would cost as much: 9 warps put 3 on one scheduler). The producer warpgroup
// drops to kProducer with setmaxnreg and the consumers take what it gave back (setmaxnreg.inc can take
// nothing else: asking for more blocks forever). WG = 4: consumers 112 registers; WG = 2: 232.
// Rows per pass of the whole-unit epilogue (store_unit, 32 bytes per row and consumer warp): all MT if the warps'
// buffers fit beside the stages and barriers, else the largest power-of-two part of MT that fits (at least 16).
constexpr int epilogue_rows(int mt, int warps, int room) {
  int rows = mt;
  while (rows > 16 && warps * rows * 32 > room) rows /= 2;
  return rows;
}

template <int MT, int WG, int STAGES>
struct TmaConfig {
  static constexpr int kThreads = 128 * (WG + 1);  // consumer warpgroups + the producer warpgroup
  static constexpr int kSmemMax = 227 * 1024;  // shared memory of one block on sm_90
  static constexpr int kBarBytes = 2 * STAGES * 8;  // the full and empty mbarriers
  static constexpr int kEpi = STAGES * TmaLayout<MT, WG>::kStage;  // the epilogue buffers follow the stages
  static constexpr int kEpiRows = epilogue_rows(MT, 4 * WG, kSmemMax - kEpi - kBarBytes);
  static constexpr int kBars = kEpi + 4 * WG * kEpiRows * 32;  // then the mbarriers
  static constexpr int kSmem = kBars + kBarBytes;
  static constexpr int kLaunch = 16384 / (32 * (WG + 1)) / 8 * 8;
  static constexpr int kProducer = WG >= 4 ? 24 : 40;
  static constexpr int kConsumer = (kLaunch * (WG + 1) - kProducer) / WG / 8 * 8;
  static_assert(kConsumer <= 256 && kProducer + kConsumer * WG <= kLaunch * (WG + 1), "register split");
  static_assert(kSmem <= kSmemMax, "shared memory of one block");
};

template <typename T,  // half or __nv_bfloat16: element type of A, scales and C
          int MT,      // rows per block (the wgmma N): 16, 32, 64, 128 or 256
          int WG,      // consumer warpgroups, one 64-column strip each
          int STAGES>  // pipeline depth in 64-row k tiles (STAGES - 1 in flight)
__global__ void __launch_bounds__(128 * (WG + 1), 1)
    wgmma_tma_kernel(const __grid_constant__ CUtensorMap tm_a,  // A [m, k], box 64 x MT, 128-byte swizzle
                     const __grid_constant__ CUtensorMap tm_b,  // codes [k/16, n] 8-byte words, box 64 WG x 4
                     const __grid_constant__ CUtensorMap tm_s,  // scales [rows, n], box 64 WG x (1 or 2)
                     T* __restrict__ c,                         // [m, n] output
                     float* __restrict__ scratch,               // [grid - dp_units, 2, MT, 64 WG] fp32 partial sums
                     int m,                                     // rows of A and C
                     int n,                                     // columns of C, multiple of 64
                     int k,                                     // depth, multiple of 64
                     int group,                                 // rows per scale group: 32, 64, 128, or k
                     int per_channel,                           // 1: scales use the per-channel permutation
                     int m_tiles,                               // row tiles: ceil(m / MT)
                     int splits,                                // split plan: k parts per unit; 0: stream-k
                     int tiles_per_block,                       // stream-k plan: k tiles of work per block
                     int vblocks,                               // the plan's blocks (>= gridDim.x)
                     int dp_units) {                            // its whole units before the stream-k runs
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = Traits<T>;
  using L = TmaLayout<MT, WG>;
  using C = TmaConfig<MT, WG, STAGES>;
  constexpr bool kScaleA = std::is_same<T, half>::value;
  constexpr int kTileN = 64 * WG;
  constexpr int kAcc = MT / 2;  // accumulator registers per thread
  extern __shared__ __align__(1024) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = (tid >> 5) & 3;
  // The role index, uniform over each warp as far as the compiler can tell (wgmmas in code it cannot prove
  // warpgroup-uniform are serialized by ptxas).
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int k_tiles = k / kTileK;
  const int n_strips = n / 64;
  // Work: unit u = (row tile u % m_tiles, column block u / m_tiles), row tile fastest so that the blocks
  // reading the same weights run together; work item w = u * k_tiles + k tile. The plan's blocks ("virtual
  // blocks" vb) are run by the launched ones in turn (vb = blockIdx.x + i gridDim.x), so that the producer
  // fills the next one's stages while the consumers finish the last.
  const int total = m_tiles * ((n + kTileN - 1) / kTileN) * k_tiles;
  const bool group32 = !per_channel && group == 32;

  const uint32_t sh = smem_addr(smem);
  const uint32_t full0 = sh + C::kBars, empty0 = full0 + 8 * STAGES;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 4 * WG);
    }
    fence_mbarrier_init();
  }
  __syncthreads();  // the only block-wide barrier: the roles part here
  grid_dependency_wait();  // any input may be the previous kernel's output

  if (wg == WG) {
    // ---- Producer warpgroup: one thread issues the tensor copies ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::kProducer) : "memory");
    if (tid == 128 * WG) {
      prefetch_tensormap(&tm_a);
      prefetch_tensormap(&tm_b);
      prefetch_tensormap(&tm_s);
      const uint32_t bytes = L::kA + L::kB + (group32 ? 2 : 1) * kTileN * 2;
      const int group_shift = per_channel ? 31 : __ffs(group) - 1;  // scale row of k row r: r >> group_shift
      int stage = 0, j = 0;
      uint32_t phase = 0;
      for (int vb = blockIdx.x; vb < vblocks; vb += gridDim.x) {
        const WorkRange range = work_range(vb, splits, tiles_per_block, k_tiles, total, dp_units);
        int f_u = range.w0 / k_tiles, f_kt = range.w0 - f_u * k_tiles;
        for (int w = range.w0; w < range.w1; ++w, ++j) {
          if (j >= STAGES) mbar_wait(empty0 + 8 * stage, phase ^ 1u);  // the consumers released its last fill
          const uint32_t base = sh + stage * L::kStage, bar = full0 + 8 * stage;
          mbar_arrive_expect_tx(bar, bytes);
          const int m0 = (f_u % m_tiles) * MT, col = (f_u / m_tiles) * kTileN;
          tma_load_2d(base, &tm_a, f_kt * kTileK, m0, bar);
          tma_load_2d(base + L::kA, &tm_b, col, f_kt * 4, bar);
          tma_load_2d(base + L::kA + L::kB, &tm_s, col, group32 ? 2 * f_kt : (f_kt * kTileK) >> group_shift, bar);
          if (++f_kt == k_tiles) f_kt = 0, ++f_u;
          if (++stage == STAGES) stage = 0, phase ^= 1u;
        }
      }
    }
    return;
  }

  // ---- Consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(C::kConsumer) : "memory");
  // This thread's A-fragment word of k16 step i: step-major codes, word `warp` of lane `lane`'s vector of
  // strip wg, + i 512 WG bytes. Scales of its two rows of C^T: columns 16 warp + lane/4 (+8) of the strip.
  const int col0 = 16 * warp + (lane >> 2);
  const uint32_t w_off = L::kA + (wg * 32 + lane) * 16 + warp * 4;
  const uint32_t s_off0 = L::kA + L::kB + 2 * (wg * 64 + scale_pos(col0, per_channel != 0));
  const uint32_t s_off1 = L::kA + L::kB + 2 * (wg * 64 + scale_pos(col0 + 8, per_channel != 0));
  auto load_scales = [&](int stage, int r, uint16_t& h0, uint16_t& h1) {  // group row r of a stage
    const uint32_t base = sh + stage * L::kStage + r * (kTileN * 2);
    h0 = lds16(base + s_off0);
    h1 = lds16(base + s_off1);
  };
  auto scale_floats = [&](int stage, int r, float& s0, float& s1) {
    uint16_t h0, h1;
    load_scales(stage, r, h0, h1);
    s0 = Tr::to_float(*reinterpret_cast<const T*>(&h0));
    s1 = Tr::to_float(*reinterpret_cast<const T*>(&h1));
  };
  // The scales, three ways: fp16 (kScaleA) multiplies the dequantized weights by them in fp16, one fp32
  // accumulator set. bf16 keeps the products of the unscaled q - 8 values in fp32 (rounding the scaled weights
  // to bf16 would cost ~2e-3 relative error): up to kBf16FoldMaxRows rows (kFold) the wgmmas sum one group into
  // grp, folded into acc with the group's fp32 scales at its end (two accumulator sets); above (kRescale, the
  // 256-row tile, where two sets do not fit) they sum into acc, which holds the running sum divided by the
  // current group's scales: where a group ends, acc *= s_old / s_new, and the segment's end multiplies by the
  // last scales. Measured on an H100 (docs/kernel.md, round 8; the rescale everywhere, on fp16's tiles): the
  // fold is 11-23% faster at 16-64 rows and 0-9% at 128, the rescaled 256-row tile 5-20% faster than the
  // fold's 128-row tiles from 256 rows.
  constexpr bool kFold = !kScaleA && MT <= kBf16FoldMaxRows;
  constexpr bool kRescale = !kScaleA && !kFold;
  float acc[kAcc], grp[kAcc];  // (grp unused, and optimized away, unless kFold)
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = grp[i] = 0.f;
  auto mma = [&](const uint32_t(&af)[4], uint64_t desc, int scale_d) {
    if constexpr (kFold) {
      wgmma_m64k16<T, MT>(grp, af, desc, scale_d);
    } else {
      wgmma_m64k16<T, MT>(acc, af, desc, scale_d);
    }
  };
  auto fence_d = [&]() {
    if constexpr (kFold) {
      fence_registers(grp);
    } else {
      fence_registers(acc);
    }
  };
  // kRescale: acc is in units of (cs0, cs1), the current group's scales of this thread's two columns.
  // next_group() moves them to the group of row r of a stage and gives the factors (f0, f1) = cs_old / cs_new
  // acc must be multiplied by (fresh_sum: acc holds no sums yet). A scale of magnitude below 2^-100, zero
  // included, counts as zero: its column's q - 8 values are masked out of the A fragments by the
  // dequantization (flags y0, y1; Traits::dequant_keep) and cs is kept, so the factors stay finite (fp32
  // overflows only if a column's scales span more than ~2^100).
  constexpr float kTiny = 0x1p-100f;
  float cs0 = 1.f, cs1 = 1.f;
  bool z0 = false, z1 = false;  // the current group's zero flags
  auto next_group = [&](int stage, int r, bool fresh_sum, float& f0, float& f1, bool& y0, bool& y1) {
    float s0, s1;
    scale_floats(stage, r, s0, s1);
    y0 = fabsf(s0) < kTiny, y1 = fabsf(s1) < kTiny;
    if (fresh_sum) cs0 = cs1 = 1.f;
    if (y0) s0 = cs0;
    if (y1) s1 = cs1;
    f0 = __fdividef(cs0, s0), f1 = __fdividef(cs1, s1);
    cs0 = s0, cs1 = s1, z0 = y0, z1 = y1;
  };

  int stage = 0;
  uint32_t phase = 0;
  int held = -1;  // stage of the tile whose wgmmas may still be in flight (not yet released)
  float ps0 = 0.f, ps1 = 0.f;  // kFold: the fp32 scales of the group sum in grp
  const int tiles_per_group = per_channel ? k_tiles : group32 ? 1 : group / kTileK;
  for (int vb = blockIdx.x; vb < vblocks; vb += gridDim.x) {
    const WorkRange range = work_range(vb, splits, tiles_per_block, k_tiles, total, dp_units);
    const int w0 = range.w0, w1 = range.w1;
    const int first_unit = w0 / k_tiles;
    int u = first_unit, kt = w0 - first_unit * k_tiles;
    for (int w = w0; w < w1; ++u) {
      const int seg_kt0 = kt;
      const int seg_w1 = min(w1, (u + 1) * k_tiles);
      bool fresh = true;     // the next wgmma starts a new sum (scale-d = 0)
      bool pending = false;  // kFold: grp holds a finished group not yet folded
      for (; w < seg_w1; ++w, ++kt) {
        mbar_wait(full0 + 8 * stage, phase);
        const uint32_t base = sh + stage * L::kStage;
        // kEarly (256 rows, 232 registers): this tile's codes are dequantized and its scales read while the
        // previous tile's wgmmas still run; only the scale products, which write the A registers, wait for
        // them. (bf16, and fp16 per channel, apply no scales to the weights; kEarly then multiplies by 1.0, so
        // that the A registers are always written after the wait: ptxas serializes the wgmmas if the
        // dequantization writes them.)
        constexpr bool kEarly = MT == 256;
        uint32_t wq[4][4];  // dequantized q - 8 pairs, one set per k16 step
        constexpr uint32_t kOnePair = kScaleA ? 0x3C003C00u : 0x3F803F80u;  // 1.0, 1.0 in T
        uint32_t s0p = kOnePair, s1p = kOnePair, s0q = kOnePair, s1q = kOnePair;
        // kRescale: a tile that starts a group reads the group's scales and factors before the wait, so that only
        // the multiplication of acc follows it; zp/zq: the zero flags of its k16 steps 0-1 and (g32) 2-3.
        const bool enters = fresh || group32 || kt % tiles_per_group == 0;
        bool zp0 = z0, zp1 = z1, zq0 = false, zq1 = false;
        float r0 = 1.f, r1 = 1.f, rq0 = 1.f, rq1 = 1.f;
        if constexpr (kRescale) {
          if (enters) next_group(stage, 0, fresh, r0, r1, zp0, zp1);
          if (group32) next_group(stage, 1, false, rq0, rq1, zq0, zq1);
        }
        auto load_tile = [&]() {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t word = lds32(base + w_off + 512 * WG * i);
            if constexpr (kRescale) {
              const bool second = group32 && i >= 2;
              Tr::dequant_keep(word, wq[i], !(second ? zq0 : zp0), !(second ? zq1 : zp1));
            } else {
              Tr::dequant(word, wq[i]);
            }
          }
          if (kScaleA && !per_channel) {
            uint16_t h0, h1;
            load_scales(stage, 0, h0, h1);
            s0p = h0 * 0x10001u, s1p = h1 * 0x10001u;
            if (group32) {
              load_scales(stage, 1, h0, h1);
              s0q = h0 * 0x10001u, s1q = h1 * 0x10001u;
            }
          }
        };
        if constexpr (kEarly) load_tile();
        wgmma_wait<0>();
        fence_d();
        if (kFold && pending) {  // the previous tile closed a group
          scale_fold<true>(acc, grp, ps0, ps1);
          fresh = true;
        }
        if (kRescale && enters && !fresh) scale_fold<false>(acc, acc, r0, r1);
        // The previous tile's wgmmas are complete: its stage goes back to the producer.
        if (held >= 0 && lane == 0) mbar_arrive(empty0 + 8 * held);
        if constexpr (!kEarly) load_tile();
        uint32_t af[4][4];  // this tile's A fragments, one per k16 step
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (kEarly || (kScaleA && !per_channel)) {
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
        if (!kScaleA && group32) {  // two groups per tile: the move to the second is made mid-tile
          mma(af[0], desc, kFold || fresh ? 0 : 1);
          mma(af[1], desc + 2, 1);
          wgmma_commit();
          wgmma_wait<0>();
          fence_d();
          if constexpr (kFold) {
            float s0, s1;
            scale_floats(stage, 0, s0, s1);
            scale_fold<true>(acc, grp, s0, s1);
          } else {
            scale_fold<false>(acc, acc, rq0, rq1);
          }
          wgmma_fence();
          mma(af[2], desc + 4, kFold ? 0 : 1);
          mma(af[3], desc + 6, 1);
          wgmma_commit();
          if constexpr (kFold) {
            scale_floats(stage, 1, ps0, ps1);
            pending = true;
          }
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) mma(af[i], desc + 2 * i, fresh && i == 0 ? 0 : 1);
          wgmma_commit();
          if constexpr (kFold) {
            scale_floats(stage, 0, ps0, ps1);  // the group (or channel) of this tile
            pending = (kt + 1) % tiles_per_group == 0;
          }
        }
        fence_d();
        held = stage;
        fresh = false;
        if (++stage == STAGES) stage = 0, phase ^= 1u;
      }
      if (w == w1 && vb + static_cast<int>(gridDim.x) >= vblocks) launch_dependents();
      wgmma_wait<0>();
      fence_d();
      if constexpr (kScaleA) {
        if (per_channel) {  // acc = scale * acc, with the scales of the last tile's stage (row 0)
          float s0, s1;
          scale_floats(held, 0, s0, s1);
          scale_fold<false>(acc, acc, s0, s1);
        }
      } else if constexpr (kFold) {
        scale_fold<true>(acc, grp, ps0, ps1);  // the last group (complete or cut by the segment's end)
      } else {
        scale_fold<false>(acc, acc, cs0, cs1);  // the sum, from units of the last group's scales
      }
      if (lane == 0) mbar_arrive(empty0 + 8 * held);
      held = -1;
      // The segment's sum to C (the whole unit) or to this block's scratch slot (0: its first unit, 1: its last).
      const int strip = (u / m_tiles) * WG + wg;
      if (strip < n_strips) {  // uniform over the warpgroup
        if (seg_kt0 == 0 && kt == k_tiles) {
          store_unit<T, MT, C::kEpiRows>(acc, c, sh + C::kEpi + (tid >> 5) * (C::kEpiRows * 32), m, n,
                                         (u % m_tiles) * MT, strip * 64 + 16 * warp, lane);
        } else {
          float* slot = scratch + (static_cast<size_t>(vb - dp_units) * 2 + (u == first_unit ? 0 : 1)) * (MT * kTileN);
          store_partial<MT, WG>(acc, slot, m, (u % m_tiles) * MT, wg, lane, col0);
        }
      }
      if constexpr (kFold) {  // (otherwise the next segment's first wgmma overwrites acc)
#pragma unroll
        for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
      }
      kt = 0;
    }
  }
#else
  __trap();  // launched only when compiled() (sm_90a code present)
#endif
}

}  // namespace sm90
}  // namespace marlin
