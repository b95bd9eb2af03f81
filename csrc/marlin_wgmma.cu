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
// A block has WG warpgroups (WG x 64 columns) and MT rows (16, 32, 64 or 128); it covers one (row tile,
// column block, k part) unit. Weights, activations and scales flow through a STAGES-deep cp.async pipeline,
// fetched STAGES - 2 tiles ahead so that a stage is refilled only after the wgmmas that read it have
// completed: each warpgroup waits for its previous tile's wgmmas before it rewrites their A registers and
// issues the next tile's. fp16 applies the group scales to the dequantized weights (16-bit products, one
// fp32 accumulator set); bf16 keeps fp32 group sums apart from the running sum and folds them in with their
// fp32 scale at the end of each group, as the mma.sync kernels do. When the grid would leave multiprocessors
// idle, k is split into equal parts; the parts' fp32 sums go to scratch and a second kernel adds them in part
// order (deterministic, no state kept between launches, graph-safe).
#include "marlin_kernel.h"
#include "marlin_launch.cuh"
#include "marlin_layout.cuh"
#include "marlin_ptx.cuh"
#include "marlin_sm90.h"
#include "marlin_wgmma.cuh"

namespace marlin {
namespace sm90 {

constexpr int kTileK = 64;         // k rows per pipeline stage (four k16 steps)
constexpr int kMinPartTiles = 4;   // k tiles per split part at least
constexpr int kPartCostTiles = 3;  // fixed cost of a block (pipeline fill, epilogue), in tiles of work

// Bytes of one pipeline stage for MT rows and WG warpgroups (64-column strips). The activations come
// first: stage strides are multiples of 1024 bytes, as the 128-byte swizzle atoms of the wgmma B operand need.
template <int MT, int WG>
struct Layout {
  static constexpr int kA = MT * 128;          // activations: MT rows x 64 k (16-bit), swizzled
  static constexpr int kB = WG * 4 * 512;      // weights: [strip][k16 step][lane] 16-byte vectors
  static constexpr int kS = 2 * (64 * WG) * 2; // scales: up to two group rows x the block's columns
  static constexpr int kStage = (kA + kB + kS + 1023) / 1024 * 1024;
};

// Launch configurations (8 stages, 6 tiles in flight per block; 12 measured 0.5-2% slower), chosen by pick():
//  - fp16, MT = 16..128: four warpgroups (256 columns per block, so each activation tile feeds twice the
//    weights; two warpgroups with 2-3 blocks per SM measured 5-31% slower in the per-model sums), scales applied to the
//    dequantized weights in fp16 (one fp32 accumulator set: ~2e-4 relative error, like the mma.sync
//    kernel's 4-row-block variant); one block of 512 threads per SM.
//  - fp16, m > 128: MT = 256 (m64n256k16 wgmmas, 128 accumulators per thread) with two warpgroups and 6
//    stages (37 KB each), one block per SM: 2-11% faster than MT = 128 at m = 256 and 512 on the H200.
//  - bf16 (and any dtype with SCALE_A false): two warpgroups with fp32 group sums folded in with fp32
//    scales (rounding the scaled weights to bf16 would cost ~2e-3); MT = 64: two blocks per SM (~120
//    registers), MT = 128: one (~220).
template <int MT, int WG, int STAGES>
struct Config {
  static constexpr int kStages = STAGES;
  static constexpr int kBlocksPerSm = WG == 2 && MT == 64 ? 2 : 1;
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
                 float* __restrict__ scratch,       // [splits, m, n] fp32 partial sums (splits > 1)
                 int m,                             // rows of A and C
                 int n,                             // columns of C, multiple of 64
                 int k,                             // depth, multiple of 64
                 int lda,                           // row stride of A in elements
                 int group,                         // rows per scale group: 32, 64, 128, or k per channel
                 int per_channel,                   // 1: scales use the per-channel permutation
                 int m_tiles,                       // row tiles: ceil(m / MT)
                 int splits) {                      // k parts per (row tile, column block)
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
  // Unit of this block: row tile fastest, so that the blocks reading the same weights run together.
  const int mt = blockIdx.x % m_tiles;
  const int rest = blockIdx.x / m_tiles;
  const int part = rest % splits, nb = rest / splits;
  const int kt0 = part * k_tiles / splits, kt1 = (part + 1) * k_tiles / splits;
  const int m0 = mt * MT;
  const int strip = nb * WG + wg;
  const bool active = strip < n_strips;  // uniform over the warpgroup
  const bool group32 = !per_channel && group == 32;
  const int tiles_per_group = per_channel ? k_tiles : (group32 ? 1 : group / kTileK);
  auto scale_row = [&](int kt, int r) { return per_channel ? 0 : (kt * kTileK + 32 * r) / group; };

  // Copies per stage: activation chunks (MT rows x 8 chunks of 16 bytes), one weight vector per thread
  // (warpgroup wg copies its own strip: k16 step `warp`, lane `lane`), and the scale rows.
  constexpr int kActPerThread = (MT * 8 + kThreads - 1) / kThreads;
  static_assert(MT * 8 % kThreads == 0 || kActPerThread == 1, "activation copies must tile the threads");
  constexpr int kScaleVecs = kTileN / 8;  // 16-byte scale vectors per group row
  const uint32_t sh = smem_addr(smem);
  const T* a_src[kActPerThread];
  uint32_t a_dst[kActPerThread];
  bool a_ok[kActPerThread], a_cp[kActPerThread];
#pragma unroll
  for (int r = 0; r < kActPerThread; ++r) {
    const int v = tid + r * kThreads, row = v >> 3, chunk = v & 7;
    a_cp[r] = v < MT * 8;  // this thread copies chunk v
    a_ok[r] = a_cp[r] && m0 + row < m;
    a_src[r] = a + static_cast<size_t>(a_ok[r] ? m0 + row : 0) * lda + chunk * 8;
    a_dst[r] = row * 128 + ((chunk ^ (row & 7)) << 4);
  }
  const int4* b_src = qweight + static_cast<size_t>(warp) * n_words + strip * 32 + lane;
  const uint32_t b_dst = L::kA + tid * 16;
  const int s_r = tid / kScaleVecs, s_chunk = tid % kScaleVecs;
  const bool s_ok = tid < (group32 ? 2 : 1) * kScaleVecs && nb * kTileN + s_chunk * 8 < n;
  const T* s_src = scales + nb * kTileN + s_chunk * 8;
  const uint32_t s_dst = L::kA + L::kB + s_r * (kTileN * 2) + s_chunk * 16;
  auto fetch = [&](int stage, int kt) {
    const uint32_t base = sh + stage * L::kStage;
#pragma unroll
    for (int r = 0; r < kActPerThread; ++r) {
      if (a_cp[r]) cp_async16_zfill(base + a_dst[r], a_src[r] + kt * kTileK, a_ok[r]);
    }
    // Beyond the last strip: zeros (the warpgroup computes on them, uniformly, and stores nothing).
    cp_async16_zfill(base + b_dst, active ? b_src + static_cast<size_t>(kt) * 4 * n_words : qweight, active);
    if (s_ok) cp_async16(base + s_dst, s_src + static_cast<size_t>(scale_row(kt, s_r)) * n);
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

  grid_dependency_wait();  // any input may be the previous kernel's output

  // Tiles fetched ahead: tile t's stage is refilled at iteration t + 2, after the barrier that follows every
  // warpgroup's wait for tile t's wgmmas (at t + 1).
  constexpr int kAhead = STAGES - 2;
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (kt0 + s < kt1) fetch(s, kt0 + s);
    cp_async_commit();
  }

  int stage = 0, f_stage = kAhead;
  bool pending = false;            // !SCALE_A: grp holds a finished group not yet folded
  int pend_stage = 0, pend_r = 0;  // where that group's scales are
  bool fresh = true;               // the next wgmma starts a new sum (scale-d = 0)
  for (int kt = kt0; kt < kt1; ++kt) {
    cp_async_wait<kAhead - 1>();
    fence_proxy_async_shared();
    __syncthreads();  // tile kt visible to all; every warpgroup is done with tile kt - 2's stage
    if (kt + kAhead < kt1) fetch(f_stage, kt + kAhead);
    cp_async_commit();
    if (++f_stage == STAGES) f_stage = 0;

    // Every warpgroup runs this, also an inactive one: ptxas serializes wgmmas in divergent code.
    const uint32_t base = sh + stage * L::kStage;
    // Tile kt - 1's wgmmas must be done before their A registers are rewritten (reading registers an
    // in-flight wgmma reads is undefined) and before a fold. (Keeping one tile's wgmmas in flight with
    // double-buffered A registers measured no faster on the H200.)
    wgmma_wait<0>();
    fence_d();
    if (!SCALE_A && pending) {
      fold(pend_stage, pend_r, grp);
      fresh = true;
    }
    uint32_t af[4][4];  // this tile's A fragments, one per k16 step
    // SCALE_A: 16-bit pairs (s, s) of this thread's rows g and g + 8, for the tile's group rows 0 and 1.
    uint32_t s0p = 0u, s1p = 0u, s0q = 0u, s1q = 0u;
    if (SCALE_A && !per_channel) {
      uint16_t h0, h1;
      load_scales(stage, 0, h0, h1);
      s0p = h0 * 0x10001u, s1p = h1 * 0x10001u;
      if (group32) {
        load_scales(stage, 1, h0, h1);
        s0q = h0 * 0x10001u, s1q = h1 * 0x10001u;
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t w[4];
      Tr::dequant(lds32(base + w_off + 512 * i), w);
      if (SCALE_A && !per_channel) {
        const bool second = group32 && i >= 2;
        const uint32_t s0 = second ? s0q : s0p, s1 = second ? s1q : s1p;
        af[i][0] = Tr::mul(w[0], s0), af[i][1] = Tr::mul(w[2], s1);
        af[i][2] = Tr::mul(w[1], s0), af[i][3] = Tr::mul(w[3], s1);
      } else {
        af[i][0] = w[0], af[i][1] = w[2], af[i][2] = w[1], af[i][3] = w[3];
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
  cp_async_wait<0>();
  launch_dependents();
  wgmma_wait<0>();
  fence_d();
  if constexpr (SCALE_A) {
    if (per_channel) fold(pend_stage, 0, acc);  // acc = scale * acc (pend_stage: any stage holds row 0)
  } else {
    fold(pend_stage, pend_r, grp);  // the last group (complete or cut by the part's end)
  }
  if (!active) return;

  // Element 4q + 2h + e of acc: column strip*64 + col0 + 8h, row m0 + 8q + 2(lane%4) + e.
  const int col = strip * 64 + col0;
  const int row0 = m0 + 2 * (lane & 3);
  float* part_sums = scratch + static_cast<size_t>(part) * m * n;
#pragma unroll
  for (int q = 0; q < kAcc / 4; ++q)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int row = row0 + 8 * q + e;
      if (row < m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float v = acc[4 * q + 2 * h + e];
          const size_t at = static_cast<size_t>(row) * n + col + 8 * h;
          if (splits == 1) {
            c[at] = Tr::from_float(v);
          } else {
            part_sums[at] = v;
          }
        }
      }
    }
#else
  __trap();  // launched only when compiled() (sm_90a code present)
#endif
}

// c[i] = sum over the k parts p (in order) of scratch[p][i], four elements per thread.
template <typename T>
__global__ void sum_parts_kernel(const float* __restrict__ scratch,  // [parts, m * n] partial sums
                                 T* __restrict__ c,                  // [m * n] output
                                 long long count,                    // m * n, multiple of 4
                                 int parts) {
  using T2 = typename Traits<T>::T2;
  grid_dependency_wait();  // the gemm kernel's partial sums
  launch_dependents();
  const long long i = 4 * (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (i >= count) return;
  float4 s = __ldcg(reinterpret_cast<const float4*>(scratch + i));
  for (int p = 1; p < parts; ++p) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(scratch + p * count + i));
    s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
  }
  reinterpret_cast<T2*>(c + i)[0] = Traits<T>::pack2(s.x, s.y);
  reinterpret_cast<T2*>(c + i)[1] = Traits<T>::pack2(s.z, s.w);
}

// Grid shape of one call: row tiles x column blocks x k parts.
struct Plan {
  int m_tiles, n_blocks, splits;
};

// k parts per (row tile, column block): the count that minimizes the modelled time, (blocks per SM,
// rounded up) x (tiles per part + the fixed cost of a block), with parts of at least kMinPartTiles tiles
// and at most 8 blocks per SM (which also bounds the scratch).
Plan make_plan(int m, int n, int k, int mt, int wg, int sms) {
  Plan p;
  p.m_tiles = (m + mt - 1) / mt;
  p.n_blocks = (n + 64 * wg - 1) / (64 * wg);
  const long long units = static_cast<long long>(p.m_tiles) * p.n_blocks;
  const int k_tiles = k / kTileK;
  const int most = k_tiles / kMinPartTiles;
  p.splits = 1;
  double best = 0.0;
  for (int s = 1; s <= (most > 1 ? most : 1); ++s) {
    if (s > 1 && units * s > 8LL * sms) break;
    const double waves = static_cast<double>((units * s + sms - 1) / sms);
    const double cost = waves * (static_cast<double>(k_tiles) / s + kPartCostTiles);
    if (s == 1 || cost < best) best = cost, p.splits = s;
  }
  return p;
}

// The configuration a call with m rows of dtype runs: rows per block and warpgroups per block. fp16: the
// smallest of 16, 32, 64, 128 rows that covers m with four warpgroups, above 128 rows 256 with two; bf16:
// 64 or 128 rows with two.
void pick(int m, int dtype, int& mt, int& wg) {
  const bool fp16 = dtype == MARLIN_FP16;
  mt = fp16 && m <= 16 ? 16 : fp16 && m <= 32 ? 32 : m <= 64 ? 64 : fp16 && m > 128 ? 256 : 128;
  wg = fp16 && mt <= 128 ? 4 : 2;
}

size_t plan_scratch_bytes(const Plan& p, int m, int n) {
  return p.splits > 1 ? static_cast<size_t>(p.splits) * m * n * sizeof(float) : 0;
}

template <typename T, int MT, int WG, bool SCALE_A, int STAGES>
int launch(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, size_t scratch_bytes, int m, int n,
           int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  using C = Config<MT, WG, STAGES>;
  auto kernel = wgmma_kernel<T, MT, WG, SCALE_A, C::kStages, C::kBlocksPerSm>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  const Plan p = make_plan(m, n, k, MT, WG, sms);
  if (plan_scratch_bytes(p, m, n) > scratch_bytes) return MARLIN_ERR_SCRATCH;
  if (launch_kernel(kernel, p.m_tiles * p.n_blocks * p.splits, 128 * WG, C::kSmem, stream, pdl, a, qweight, scales, c,
                    scratch, m, n, k, lda, group, per_channel, p.m_tiles, p.splits) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  if (p.splits > 1) {
    const long long count = static_cast<long long>(m) * n;
    const int threads = 256;
    const long long blocks = (count / 4 + threads - 1) / threads;
    if (launch_kernel(sum_parts_kernel<T>, static_cast<int>(blocks), threads, 0, stream, pdl,
                      static_cast<const float*>(scratch), c, count, p.splits) != cudaSuccess) {
      return MARLIN_ERR_LAUNCH;
    }
  }
  return MARLIN_OK;
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
  return plan_scratch_bytes(make_plan(m, n, k, mt, wg, sms), m, n);
}

template <int MT>
int launch_fp16(const half* a, const int4* qweight, const half* scales, half* c, float* scratch, size_t scratch_bytes,
                int m, int n, int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  return launch<half, MT, 4, true, 8>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel,
                                      sms, pdl, stream);
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
        return launch_fp16<16>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                               pdl, stream);
      case 32:
        return launch_fp16<32>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                               pdl, stream);
      case 64:
        return launch_fp16<64>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                               pdl, stream);
      case 256:
        return launch<half, 256, 2, true, 6>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group,
                                             per_channel, sms, pdl, stream);
      default:
        return launch_fp16<128>(a16, qweight, s16, c16, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                                pdl, stream);
    }
  }
  const __nv_bfloat16* ab = static_cast<const __nv_bfloat16*>(a);
  const __nv_bfloat16* sb = static_cast<const __nv_bfloat16*>(scales);
  __nv_bfloat16* cb = static_cast<__nv_bfloat16*>(c);
  return mt == 64 ? launch<__nv_bfloat16, 64, 2, false, 8>(ab, qweight, sb, cb, scratch, scratch_bytes, m, n, k,
                                                                  lda, group, per_channel, sms, pdl, stream)
                  : launch<__nv_bfloat16, 128, 2, false, 8>(ab, qweight, sb, cb, scratch, scratch_bytes, m, n,
                                                                   k, lda, group, per_channel, sms, pdl, stream);
}

}  // namespace sm90
}  // namespace marlin
