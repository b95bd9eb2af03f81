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
// A block has two warpgroups (128 columns) and MT = 64 or 128 rows; it covers one (row tile, column block,
// k part) unit. Weights, activations and scales flow through a STAGES-deep cp.async pipeline, fetched
// STAGES - 2 tiles ahead so that a stage is refilled only after the wgmmas that read it have completed
// (each warpgroup waits for its previous tile's wgmmas before issuing the next, while the next tile's
// weights are already dequantized). Group sums are kept in fp32 apart from the running sum and folded in
// with their fp32 scale at the end of each scale group, as in the mma.sync kernels. When the grid would
// leave multiprocessors idle, k is split into equal parts; the parts' fp32 sums go to scratch and a second
// kernel adds them in part order (deterministic, no state kept between launches, graph-safe).
#include "marlin_kernel.h"
#include "marlin_launch.cuh"
#include "marlin_layout.cuh"
#include "marlin_ptx.cuh"
#include "marlin_sm90.h"
#include "marlin_wgmma.cuh"

namespace marlin {
namespace sm90 {

constexpr int kWarpGroups = 2;              // per block, one 64-column strip each
constexpr int kThreads = 128 * kWarpGroups;
constexpr int kTileN = 64 * kWarpGroups;    // columns per block
constexpr int kTileK = 64;                  // k rows per pipeline stage (four k16 steps)
constexpr int kMinPartTiles = 4;            // k tiles per split part at least

// Bytes of one pipeline stage for MT rows. The activations come first: stage strides are multiples of
// 1024 bytes, as the 128-byte swizzle atoms of the wgmma B operand need.
template <int MT>
struct Layout {
  static constexpr int kA = MT * 128;                // activations: MT rows x 64 k (16-bit), swizzled
  static constexpr int kB = kWarpGroups * 4 * 512;   // weights: [strip][k16 step][lane] 16-byte vectors
  static constexpr int kS = 2 * kTileN * 2;          // scales: up to two group rows x kTileN columns
  static constexpr int kStage = (kA + kB + kS + 1023) / 1024 * 1024;
};

// Pipeline depth and blocks per multiprocessor per row tile: MT = 64 needs ~100 registers per thread (two
// blocks per SM), MT = 128 ~170 (one block); 8 stages keep 6 tiles of weights in flight per block.
template <int MT>
struct Config;
template <>
struct Config<64> {
  static constexpr int kStages = 8;
  static constexpr int kBlocksPerSm = 2;
};
template <>
struct Config<128> {
  static constexpr int kStages = 8;
  static constexpr int kBlocksPerSm = 1;
};

template <typename T,     // half or __nv_bfloat16: element type of A, scales and C
          int MT,         // rows per block (the wgmma N): 64 or 128
          int STAGES,     // cp.async pipeline depth in 64-row k tiles
          int MIN_BLOCKS> // blocks per SM the register allocation must allow
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS)
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
  using L = Layout<MT>;
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
  const int strip = nb * kWarpGroups + wg;
  const bool active = strip < n_strips;  // uniform over the warpgroup
  const bool group32 = !per_channel && group == 32;
  const int tiles_per_group = per_channel ? k_tiles : (group32 ? 1 : group / kTileK);
  auto scale_row = [&](int kt, int r) { return per_channel ? 0 : (kt * kTileK + 32 * r) / group; };

  // Copies per stage: activation chunks (MT rows x 8 chunks of 16 bytes), one weight vector per thread
  // (warpgroup wg copies its own strip: k16 step `warp`, lane `lane`), and the scale rows (16 vectors each).
  constexpr int kActPerThread = MT * 8 / kThreads;
  const uint32_t sh = smem_addr(smem);
  const T* a_src[kActPerThread];
  uint32_t a_dst[kActPerThread];
  bool a_ok[kActPerThread];
#pragma unroll
  for (int r = 0; r < kActPerThread; ++r) {
    const int v = tid + r * kThreads, row = v >> 3, chunk = v & 7;
    a_ok[r] = m0 + row < m;
    a_src[r] = a + static_cast<size_t>(a_ok[r] ? m0 + row : 0) * lda + chunk * 8;
    a_dst[r] = row * 128 + ((chunk ^ (row & 7)) << 4);
  }
  const int4* b_src = qweight + static_cast<size_t>(warp) * n_words + strip * 32 + lane;
  const uint32_t b_dst = L::kA + tid * 16;
  const int s_r = tid >> 4, s_chunk = tid & 15;
  const bool s_ok = tid < (group32 ? 32 : 16) && nb * kTileN + s_chunk * 8 < n;
  const T* s_src = scales + nb * kTileN + s_chunk * 8;
  const uint32_t s_dst = L::kA + L::kB + s_r * (kTileN * 2) + s_chunk * 16;
  auto fetch = [&](int stage, int kt) {
    const uint32_t base = sh + stage * L::kStage;
#pragma unroll
    for (int r = 0; r < kActPerThread; ++r) cp_async16_zfill(base + a_dst[r], a_src[r] + kt * kTileK, a_ok[r]);
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

  float acc[kAcc], grp[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = grp[i] = 0.f;
  // acc += scale * grp with the scales of group row r held in pipeline stage `stage`.
  auto fold = [&](int stage, int r) {
    const uint32_t base = sh + stage * L::kStage + r * (kTileN * 2);
    const uint16_t h0 = lds16(base + s_off0), h1 = lds16(base + s_off1);
    const float s0 = Tr::to_float(*reinterpret_cast<const T*>(&h0));
    const float s1 = Tr::to_float(*reinterpret_cast<const T*>(&h1));
#pragma unroll
    for (int q = 0; q < kAcc / 4; ++q) {
      acc[4 * q + 0] += s0 * grp[4 * q + 0];
      acc[4 * q + 1] += s0 * grp[4 * q + 1];
      acc[4 * q + 2] += s1 * grp[4 * q + 2];
      acc[4 * q + 3] += s1 * grp[4 * q + 3];
    }
  };

  grid_dependency_wait();  // any input may be the previous kernel's output

#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (kt0 + s < kt1) fetch(s, kt0 + s);
    cp_async_commit();
  }

  int stage = 0, f_stage = STAGES - 2;
  bool pending = false;            // grp holds a finished group not yet folded
  int pend_stage = 0, pend_r = 0;  // where that group's scales are
  bool fresh = true;               // the next wgmma starts a new group sum (scale-d = 0)
  for (int kt = kt0; kt < kt1; ++kt) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async_shared();
    __syncthreads();  // tile kt visible to all; every warpgroup is done with tile kt - 2's stage
    if (kt + STAGES - 2 < kt1) fetch(f_stage, kt + STAGES - 2);
    cp_async_commit();
    if (++f_stage == STAGES) f_stage = 0;

    {  // every warpgroup, also an inactive one: wgmma code in divergent branches gets serialized by ptxas
      const uint32_t base = sh + stage * L::kStage;
      uint32_t af[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t w[4];
        Tr::dequant(lds32(base + w_off + 512 * i), w);
        af[i][0] = w[0], af[i][1] = w[2], af[i][2] = w[1], af[i][3] = w[3];
      }
      wgmma_wait<0>();  // tile kt - 1's wgmmas (they overlapped the dequantization above)
      fence_registers(grp);
      if (pending) {
        fold(pend_stage, pend_r);
        fresh = true;
      }
      const uint64_t desc = smem_desc_k128(base);  // + 2 per k16 step (32 bytes, in 16-byte units)
      wgmma_fence();
      if (group32) {
        wgmma_m64k16<T, MT>(grp, af[0], desc, 0);
        wgmma_m64k16<T, MT>(grp, af[1], desc + 2, 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(grp);
        fold(stage, 0);
        wgmma_fence();
        wgmma_m64k16<T, MT>(grp, af[2], desc + 4, 0);
        wgmma_m64k16<T, MT>(grp, af[3], desc + 6, 1);
        wgmma_commit();
        pending = true;
        pend_r = 1;
      } else {
        wgmma_m64k16<T, MT>(grp, af[0], desc, fresh ? 0 : 1);
        wgmma_m64k16<T, MT>(grp, af[1], desc + 2, 1);
        wgmma_m64k16<T, MT>(grp, af[2], desc + 4, 1);
        wgmma_m64k16<T, MT>(grp, af[3], desc + 6, 1);
        wgmma_commit();
        pending = (kt + 1) % tiles_per_group == 0;
        pend_r = 0;
      }
      fence_registers(grp);
      pend_stage = stage;
      fresh = false;
    }
    if (++stage == STAGES) stage = 0;
  }
  cp_async_wait<0>();
  launch_dependents();
  wgmma_wait<0>();
  fence_registers(grp);
  fold(pend_stage, pend_r);  // the last group (complete or cut by the part's end)
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
                                 int count,                          // m * n, multiple of 4
                                 int parts) {
  using T2 = typename Traits<T>::T2;
  grid_dependency_wait();  // the gemm kernel's partial sums
  launch_dependents();
  const int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= count) return;
  float4 s = __ldcg(reinterpret_cast<const float4*>(scratch + i));
  for (int p = 1; p < parts; ++p) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(scratch + static_cast<size_t>(p) * count + i));
    s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
  }
  reinterpret_cast<T2*>(c + i)[0] = Traits<T>::pack2(s.x, s.y);
  reinterpret_cast<T2*>(c + i)[1] = Traits<T>::pack2(s.z, s.w);
}

// k parts per unit: enough to fill `slots` block slots, each part at least kMinPartTiles tiles.
int plan_splits(int units, int k_tiles, int slots) {
  int splits = units >= slots ? 1 : slots / units;
  const int most = k_tiles / kMinPartTiles;
  if (splits > most) splits = most;
  return splits < 1 ? 1 : splits;
}

template <typename T, int MT>
int launch(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, size_t scratch_bytes, int m, int n,
           int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  using C = Config<MT>;
  auto kernel = wgmma_kernel<T, MT, C::kStages, C::kBlocksPerSm>;
  constexpr int smem = C::kStages * Layout<MT>::kStage;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  const int m_tiles = (m + MT - 1) / MT, n_blocks = (n + kTileN - 1) / kTileN, k_tiles = k / kTileK;
  const int splits = plan_splits(m_tiles * n_blocks, k_tiles, sms * C::kBlocksPerSm);
  if (splits > 1 && static_cast<size_t>(splits) * m * n * sizeof(float) > scratch_bytes) return MARLIN_ERR_SCRATCH;
  if (launch_kernel(kernel, m_tiles * n_blocks * splits, kThreads, smem, stream, pdl, a, qweight, scales, c, scratch,
                    m, n, k, lda, group, per_channel, m_tiles, splits) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  if (splits > 1) {
    const int count = m * n, threads = 256;
    const int blocks = (count / 4 + threads - 1) / threads;
    if (launch_kernel(sum_parts_kernel<T>, blocks, threads, 0, stream, pdl, static_cast<const float*>(scratch), c,
                      count, splits) != cudaSuccess) {
      return MARLIN_ERR_LAUNCH;
    }
  }
  return MARLIN_OK;
}

template <typename T>
int gemm_t(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, size_t scratch_bytes, int m, int n,
           int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  if (m <= 64) {
    return launch<T, 64>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms, pdl,
                         stream);
  }
  return launch<T, 128>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms, pdl,
                        stream);
}

bool compiled() {
#if defined(MARLIN_SM90A)
  return true;
#else
  return false;
#endif
}

size_t scratch_bytes(int sms) {
  // With splits > 1 the grid fits in one wave: splits x m x n <= slots x MT x kTileN.
  const size_t per_sm = Config<64>::kBlocksPerSm * 64 > Config<128>::kBlocksPerSm * 128
                            ? Config<64>::kBlocksPerSm * 64
                            : Config<128>::kBlocksPerSm * 128;
  return static_cast<size_t>(sms) * per_sm * kTileN * sizeof(float);
}

int gemm(const void* a, const int4* qweight, const void* scales, void* c, float* scratch, size_t scratch_bytes, int m,
         int n, int k, int lda, int group, int per_channel, int dtype, int sms, bool pdl, cudaStream_t stream) {
  if (!compiled()) return MARLIN_ERR_ARCH;
  if (dtype == MARLIN_FP16) {
    return gemm_t(static_cast<const half*>(a), qweight, static_cast<const half*>(scales), static_cast<half*>(c),
                  scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms, pdl, stream);
  }
  return gemm_t(static_cast<const __nv_bfloat16*>(a), qweight, static_cast<const __nv_bfloat16*>(scales),
                static_cast<__nv_bfloat16*>(c), scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms, pdl,
                stream);
}

}  // namespace sm90
}  // namespace marlin
