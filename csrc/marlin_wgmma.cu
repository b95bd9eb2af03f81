// The Hopper (sm_90a) fused kernel's host side and its segment-sum kernel: C[m, n] = A[m, k] @ dequant(B)[k, n]
// with warpgroup MMAs (wgmma) fed by a TMA producer warpgroup (wgmma_tma_kernel, marlin_wgmma_tma.cuh, which
// says how it works), fp32 accumulation, for the batches where mma.sync cannot keep the tensor cores busy.
//
// Launch configurations, chosen by pick() (one block per SM; STAGES 64-row k tiles deep, STAGES - 1 in flight):
//  - MT = 16..128 rows: four consumer warpgroups (256 columns per block, so each activation tile feeds twice
//    the weights; two warpgroups with 2-3 blocks per SM measured 5-31% slower in the per-model sums of the
//    cp.async-fed kernel before it), 112 registers each, 8 stages. fp16 applies the group scales to the
//    dequantized weights in fp16 (one fp32 accumulator set: ~2e-4 relative error, like the mma.sync kernel's
//    4-row-block variant); bf16 folds fp32 group sums in with fp32 scales (two accumulator sets), so at 128
//    rows it takes two consumer warpgroups (2 x 64 accumulators need the 232 registers of two).
//  - m > 128: MT = 256 (m64n256k16 wgmmas, 128 accumulators per thread) with two consumer warpgroups (232
//    registers), 6 stages (37 KB each; the epilogue's warp buffers take the 4 KB left: 16 rows per pass; 5
//    stages with 128-row passes were 30-40% slower in round 9: nvcc left that pass loop rolled and put the
//    accumulators on the stack), both dtypes (bf16 rescales its one accumulator set where a group
//    ends). fp16: 2-11% faster than MT = 128 at m = 256 and 512 (H200); on the H100 128 x 256 tiles (four
//    warpgroups) were 3-4% slower for fp16 (70B m = 1024: 1% faster) and 10-12% for bf16 at m = 256-1024
//    (docs/kernel.md, round 8).
// The tensor maps are encoded on the host for each call (in a CUDA graph, once at capture); they need A, the
// codes and the scales 16-byte aligned and lda % 8 == 0, which marlin_gemm checks of every call.
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

// C over the units that more than one block worked on: the sum of their blocks' segments in block order
// (deterministic: the order depends only on the plan). Four columns per thread, rows blockIdx.y + i gridDim.y.
template <typename T>
__global__ void sum_segments_kernel(const float* __restrict__ scratch,  // [grid - dp_units, 2, mt, tile_n] sums
                                    T* __restrict__ c,                  // [m, n] output
                                    int col_begin,                      // first column of a cut unit
                                    int m,                              // rows
                                    int n,                              // columns, multiple of 64
                                    int mt,                             // rows per unit (the kernel's MT)
                                    int tile_n,                         // columns per unit (64 x WG)
                                    int m_tiles,                        // row tiles: ceil(m / mt)
                                    int k_tiles,                        // k / 64
                                    int splits,                         // the gemm launch's split plan, or 0
                                    int tiles_per_block,                // its stream-k run
                                    int dp_units) {                     // its whole units first
  using T2 = typename Traits<T>::T2;
  grid_dependency_wait();  // the gemm kernel's segment sums
  launch_dependents();
  const int col = col_begin + 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (col >= n) return;
  const int nb = col / tile_n;
  const size_t slot_size = static_cast<size_t>(mt) * tile_n;
  for (int row = blockIdx.y; row < m; row += gridDim.y) {
    const int u = nb * m_tiles + row / mt, w_first = u * k_tiles;  // the unit and its first work item
    int b0 = 0, count = 0;
    unit_blocks(u, k_tiles, splits, tiles_per_block, b0, count, dp_units);
    if (count == 1) continue;  // one block ran the whole unit and wrote C
    const int b1 = b0 + count - 1;
    // Block b holds the unit in slot 0 if the unit is its first (b starts inside it), else in slot 1
    // (split plan: always its first).
    const float* src = scratch + (row % mt) * tile_n + (col - nb * tile_n);
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int b = b0; b <= b1; ++b) {
      const int slot = splits > 0 || stream_k_start(b, tiles_per_block, k_tiles, dp_units) >= w_first ? 0 : 1;
      const float4 v =
          __ldcg(reinterpret_cast<const float4*>(src + (static_cast<size_t>(b - dp_units) * 2 + slot) * slot_size));
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    T* out = c + static_cast<size_t>(row) * n + col;
    reinterpret_cast<T2*>(out)[0] = Traits<T>::pack2(s.x, s.y);
    reinterpret_cast<T2*>(out)[1] = Traits<T>::pack2(s.z, s.w);
  }
}

// Consumer warpgroups (64-column strips) of a row tile of mt rows: four, except two on the 256-row tile and on
// bf16's 128-row tile when it folds (two accumulator sets need the 232 registers of two).
constexpr int tile_warpgroups(int mt, bool fp16) {
  return mt == 256 || (mt == 128 && !fp16 && kBf16FoldMaxRows >= 128) ? 2 : 4;
}

// The configuration a call with m rows of dtype runs: the smallest of 16, 32, 64, 128 rows per block that covers
// m, above 128 rows 256, and that tile's warpgroups.
void pick(int m, int dtype, int& mt, int& wg) {
  mt = m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : m <= 128 ? 128 : 256;
  wg = tile_warpgroups(mt, dtype == MARLIN_FP16);
}

Plan plan_for(int m, int n, int k, int mt, int wg, int sms) { return wgmma_plan(m, n, k, mt, wg, sms); }

size_t plan_scratch_bytes(const Plan& p, int k, int mt, int wg) {
  return plan_cuts(p, k / kTileK) ? static_cast<size_t>(p.grid - p.dp_units) * 2 * mt * 64 * wg * sizeof(float) : 0;
}

// The segment sums of the units that several blocks shared, when the plan cut any.
template <typename T>
int launch_sum(const Plan& p, float* scratch, T* c, int m, int n, int k, int mt, int wg, bool pdl,
               cudaStream_t stream) {
  if (!plan_cuts(p, k / kTileK)) return MARLIN_OK;
  const int threads = 128, m_tiles = (m + mt - 1) / mt;
  const int col_begin = first_cut_unit(p) / m_tiles * 64 * wg;  // the columns of the units that blocks share
  const dim3 grid(((n - col_begin) / 4 + threads - 1) / threads, m < 65535 ? m : 65535);
  return launch_kernel(sum_segments_kernel<T>, grid, threads, 0, stream, pdl, static_cast<const float*>(scratch), c,
                       col_begin, m, n, mt, 64 * wg, m_tiles, k / kTileK, p.splits, p.tiles_per_block,
                       p.dp_units) == cudaSuccess
             ? MARLIN_OK
             : MARLIN_ERR_LAUNCH;
}

template <typename T, int MT, int WG, int STAGES>
int launch(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, size_t scratch_bytes, int m, int n,
           int k, int lda, int group, int per_channel, int sms, bool pdl, cudaStream_t stream) {
  using C = TmaConfig<MT, WG, STAGES>;
  auto kernel = wgmma_tma_kernel<T, MT, WG, STAGES>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  const bool group32 = !per_channel && group == 32;
  const CUtensorMapDataType type =
      std::is_same<T, half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap tm_a, tm_b, tm_s;
  // Codes as 8-byte words: a k16 row of qweight (n / 2 16-byte vectors) is n words.
  if (!encode_2d(&tm_a, type, a, k, m, static_cast<uint64_t>(lda) * 2, kTileK, MT, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode_2d(&tm_b, CU_TENSOR_MAP_DATA_TYPE_UINT64, qweight, n, k / 16, static_cast<uint64_t>(n) * 8, 64 * WG, 4,
                 CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !encode_2d(&tm_s, type, scales, n, per_channel ? 1 : k / group, static_cast<uint64_t>(n) * 2, 64 * WG,
                 group32 ? 2 : 1, CU_TENSOR_MAP_SWIZZLE_NONE)) {
    return MARLIN_ERR_LAUNCH;
  }
  const Plan p = plan_for(m, n, k, MT, WG, sms);
  if (plan_scratch_bytes(p, k, MT, WG) > scratch_bytes) return MARLIN_ERR_SCRATCH;
  // One block per SM at most; the launched blocks run the plan's blocks in turn (persistent: measured on the H100
  // in round 9, 2-4% faster at m = 1024 than one launched block per plan block).
  const int blocks = p.grid < sms ? p.grid : sms;
  if (launch_kernel(kernel, blocks, C::kThreads, C::kSmem, stream, pdl, tm_a, tm_b, tm_s, c, scratch, m, n, k, group,
                    per_channel, (m + MT - 1) / MT, p.splits, p.tiles_per_block, p.grid, p.dp_units) != cudaSuccess) {
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

// One dtype's configurations (pick()).
template <typename T>
int gemm_t(const T* a, const int4* qweight, const T* scales, T* c, float* scratch, size_t scratch_bytes, int m, int n,
           int k, int lda, int group, int per_channel, int mt, int sms, bool pdl, cudaStream_t stream) {
  switch (mt) {
    case 16:
      return launch<T, 16, 4, 8>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                                 pdl, stream);
    case 32:
      return launch<T, 32, 4, 8>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                                 pdl, stream);
    case 64:
      return launch<T, 64, 4, 8>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms,
                                 pdl, stream);
    case 128:
      return launch<T, 128, tile_warpgroups(128, std::is_same<T, half>::value), 8>(
          a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel, sms, pdl, stream);
    default:
      return launch<T, 256, 2, 6>(a, qweight, scales, c, scratch, scratch_bytes, m, n, k, lda, group, per_channel,
                                  sms, pdl, stream);
  }
}

int gemm(const void* a, const int4* qweight, const void* scales, void* c, float* scratch, size_t scratch_bytes, int m,
         int n, int k, int lda, int group, int per_channel, int dtype, int sms, bool pdl, cudaStream_t stream) {
  if (!compiled()) return MARLIN_ERR_ARCH;
  int mt = 0, wg = 0;
  pick(m, dtype, mt, wg);
  if (dtype == MARLIN_FP16) {
    return gemm_t(static_cast<const half*>(a), qweight, static_cast<const half*>(scales), static_cast<half*>(c),
                  scratch, scratch_bytes, m, n, k, lda, group, per_channel, mt, sms, pdl, stream);
  }
  return gemm_t(static_cast<const __nv_bfloat16*>(a), qweight, static_cast<const __nv_bfloat16*>(scales),
                static_cast<__nv_bfloat16*>(c), scratch, scratch_bytes, m, n, k, lda, group, per_channel, mt, sms, pdl,
                stream);
}

}  // namespace sm90
}  // namespace marlin
