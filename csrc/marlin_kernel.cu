// The fused Marlin kernel: C[m, n] = A[m, k] @ dequant(B)[k, n] for m <= 32 per launch, fp32 accumulation.
//
// Work split. The output is cut into column blocks of 256 (4 strips of 64) and k into tiles of 64 rows;
// a (column block, k tile) pair is one unit of work, numbered column-block-major. Each of the `grid`
// thread blocks streams one contiguous run of `tiles_per_cta` units ("stream-k"), so every SM gets the
// same amount of weight to read whatever the shape. A run that covers only part of a column block's k
// range produces a partial sum ("segment"); the segments of a column block are added in segment order by
// whichever block finishes last (per-strip arrival counters in `locks`), so results are bit-identical
// from run to run and no block ever waits on another.
//
// Inside a block: 8 warps = 4 strips (64 columns each) x 2 k-halves (32 rows each) of the 64x256 tile.
// Weights, activations and scales flow through a STAGES-deep cp.async pipeline in shared memory. Each
// warp dequantizes its 16-byte weight vectors with bit tricks straight into mma.sync m16n8k16 B fragments
// (q - 8, exact in fp16 and bf16) and accumulates one scale group in fp32; at the end of each group the
// group sum is multiplied by its fp32 scale and added to the running sum. Scaling in fp32 (not the
// weights in 16 bits) keeps bf16 results as accurate as fp16 ones.
#include "marlin_kernel.h"
#include "marlin_ptx.cuh"

namespace marlin {

constexpr int kThreads = 256;   // 8 warps per block
constexpr int kStripsN = 4;     // 64-column strips per block (warps along n)
constexpr int kTileK = 64;      // k rows per pipeline stage
constexpr int kTileN = 64 * kStripsN;
constexpr int kMaxRows = 32;    // rows of A per launch (two m16 blocks)

// Shared memory of one pipeline stage, in 16-byte vectors.
template <int M_BLOCKS>
struct StageLayout {
  static constexpr int kB = 8 * 2 * 32;             // 8 warps x 2 k16 strips x 32 lanes
  static constexpr int kA = M_BLOCKS * 16 * 8;      // 16*M_BLOCKS rows x 64 halves
  static constexpr int kS = 2 * kTileN / 8;         // up to 2 scale rows x 256 columns
  static constexpr int kStage = kB + kA + kS;
  static constexpr int kRed = kStripsN * M_BLOCKS * 8 * 32;  // float4 per lane per n8 tile, k-half reduction
};

// Dynamic shared memory bytes for one block.
template <int M_BLOCKS, int STAGES>
constexpr int smem_bytes() {
  return 16 * (STAGES * StageLayout<M_BLOCKS>::kStage + StageLayout<M_BLOCKS>::kRed);
}

// Fused dequantize + matrix product.
template <typename T,     // half or __nv_bfloat16: element type of A, scales and C
          int M_BLOCKS,   // m16 row blocks handled (1: m <= 16, 2: m <= 32)
          int STAGES>     // cp.async pipeline depth, in 64x256 tiles
__global__ void __launch_bounds__(kThreads, 1)
    gemm_kernel(const T* __restrict__ a,           // [m, lda] activations (first k columns used)
                const int4* __restrict__ qweight,  // [k/16, n/2] packed codes as 16-byte vectors
                const T* __restrict__ scales,      // [k/group, n] or [1, n], Marlin-permuted columns
                T* __restrict__ c,                 // [m, n] output
                int* __restrict__ locks,           // [n/64] arrival counters, zero on entry and exit
                float* __restrict__ scratch,       // [n/64, max_segs, 32, 64] fp32 partial sums
                int m,                             // rows of A and C, 1..16*M_BLOCKS
                int n,                             // columns of C, multiple of 64
                int k,                             // depth, multiple of 64
                int lda,                           // row stride of A in elements
                int group,                         // rows per scale group (k when per channel)
                int per_channel,                   // 1: scales use the per-channel permutation
                int tiles_per_cta,                 // units of work per block (last block may get fewer)
                int max_segs) {                    // segment slots per strip in scratch
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  using L = StageLayout<M_BLOCKS>;
  extern __shared__ int4 smem[];
  int4* sh_red_base = smem + STAGES * L::kStage;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wn = warp % kStripsN;  // strip of this warp inside the column block
  const int wk = warp / kStripsN;  // k half (rows 32*wk .. 32*wk+31 of each tile)
  const int k_tiles = k / kTileK;
  const int n_strips = n / 64;
  const int n_blocks = (n + kTileN - 1) / kTileN;
  const int total = n_blocks * k_tiles;
  const int begin = blockIdx.x * tiles_per_cta;
  const int end = min(begin + tiles_per_cta, total);
  const int n_words = n / 2;  // 16-byte vectors per k16 row of qweight
  const int scale_rows = group == 32 ? 2 : 1;  // scale rows touched by one 64-row tile

  // Issue the copies of unit x into pipeline stage `stage`.
  auto fetch = [&](int x, int stage) {
    int4* sh = smem + stage * L::kStage;
    const int nb = x / k_tiles;
    const int kt = x - nb * k_tiles;
    const int strip = nb * kStripsN + wn;
    if (strip < n_strips) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = kt * 4 + wk * 2 + i;
        cp_async16(sh + (warp * 2 + i) * 32 + lane, qweight + static_cast<size_t>(row) * n_words + strip * 32 + lane);
      }
    }
    if (tid < L::kA) {
      const int row = tid / 8, chunk = tid % 8;
      const bool valid = row < m;
      const T* src = valid ? a + static_cast<size_t>(row) * lda + kt * kTileK + chunk * 8 : a;
      cp_async16(sh + L::kB + row * 8 + (chunk ^ (row % 8)), src, valid);
    }
    if (tid < scale_rows * (kTileN / 8)) {
      const int r = tid / (kTileN / 8), chunk = tid % (kTileN / 8);
      const int col = nb * kTileN + chunk * 8;
      if (col < n) {
        const int srow = per_channel ? 0 : kt * kTileK / group + r;
        cp_async16(sh + L::kB + L::kA + r * (kTileN / 8) + chunk, scales + static_cast<size_t>(srow) * n + col);
      }
    }
  };

  float acc[M_BLOCKS][8][4];  // running sum: [m16 block][n8 tile][mma C fragment]
  float grp[M_BLOCKS][8][4];  // sum of the current scale group, not yet scaled
#pragma unroll
  for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[b][j][e] = grp[b][j][e] = 0.f;

  // Pipeline prologue: STAGES-1 units in flight.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (begin + s < end) fetch(begin + s, s);
    cp_async_commit();
  }

  for (int x = begin; x < end; ++x) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int xf = x + STAGES - 1;
      if (xf < end) fetch(xf, (xf - begin) % STAGES);
      cp_async_commit();
    }
    const int4* sh = smem + ((x - begin) % STAGES) * L::kStage;
    const int nb = x / k_tiles;
    const int kt = x - nb * k_tiles;
    const int strip = nb * kStripsN + wn;
    const bool strip_valid = strip < n_strips;
    const bool seg_end = kt == k_tiles - 1 || x == end - 1;

    if (strip_valid) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int4 bq = sh[(warp * 2 + i) * 32 + lane];
        uint32_t af[M_BLOCKS][4];
#pragma unroll
        for (int b = 0; b < M_BLOCKS; ++b) {
          const int row = b * 16 + (lane % 16);
          const int chunk = wk * 4 + i * 2 + lane / 16;
          ldmatrix_x4(af[b], sh + L::kB + row * 8 + (chunk ^ (row % 8)));
        }
        const uint32_t words[4] = {static_cast<uint32_t>(bq.x), static_cast<uint32_t>(bq.y),
                                   static_cast<uint32_t>(bq.z), static_cast<uint32_t>(bq.w)};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t bf[4];
          Tr::dequant(words[j], bf);
#pragma unroll
          for (int b = 0; b < M_BLOCKS; ++b) {
            Tr::mma(grp[b][2 * j], af[b], bf[0], bf[1]);
            Tr::mma(grp[b][2 * j + 1], af[b], bf[2], bf[3]);
          }
        }
      }
      // Fold the group sum into the running sum when this warp's next rows start another scale group,
      // or when the segment ends.
      const int my_row = kt * kTileK + wk * 32;
      if (seg_end || (my_row + kTileK) / group != my_row / group) {
        float s0[8], s1[8];  // scale of columns 2*(lane%4) and 2*(lane%4)+1 in each n8 tile
        const int4* ss = sh + L::kB + L::kA;
        if (per_channel) {
          // Within 32 columns, lane group i = lane%4 finds columns 2i, 2i+1, 2i+8, 2i+9, ... (8 halves).
          const int4 v0 = ss[wn * 8 + (lane % 4)];
          const int4 v1 = ss[wn * 8 + 4 + (lane % 4)];
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
          // Within 64 columns, position 8i + j holds natural column 8j + i: 8 halves per column i.
          const int srow = my_row / group - kt * kTileK / group;
          const int4* sr = ss + srow * (kTileN / 8) + wn * 8;
          const int4 v0 = sr[2 * (lane % 4)];
          const int4 v1 = sr[2 * (lane % 4) + 1];
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
            acc[b][j][0] += s0[j] * grp[b][j][0];
            acc[b][j][1] += s1[j] * grp[b][j][1];
            acc[b][j][2] += s0[j] * grp[b][j][2];
            acc[b][j][3] += s1[j] * grp[b][j][3];
            grp[b][j][0] = grp[b][j][1] = grp[b][j][2] = grp[b][j][3] = 0.f;
          }
      }
    }

    if (!seg_end) continue;

    // ---- Segment epilogue (uniform over the block). 1. add the two k halves in shared memory.
    float4* sh_red = reinterpret_cast<float4*>(sh_red_base) + wn * (M_BLOCKS * 8 * 32);
    if (wk == 1 && strip_valid) {
#pragma unroll
      for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          sh_red[(b * 8 + j) * 32 + lane] = make_float4(acc[b][j][0], acc[b][j][1], acc[b][j][2], acc[b][j][3]);
        }
    }
    __syncthreads();
    if (wk == 0 && strip_valid) {
#pragma unroll
      for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float4 v = sh_red[(b * 8 + j) * 32 + lane];
          acc[b][j][0] += v.x;
          acc[b][j][1] += v.y;
          acc[b][j][2] += v.z;
          acc[b][j][3] += v.w;
        }

      // 2. this block's part of the column block: the whole k range, or one segment of several.
      const int first_cta = nb * k_tiles / tiles_per_cta;
      const int last_cta = (nb * k_tiles + k_tiles - 1) / tiles_per_cta;
      const int n_segs = last_cta - first_cta + 1;
      const int seg = blockIdx.x - first_cta;
      const int col = strip * 64 + 2 * (lane % 4);  // + 8 * j: this lane's column pair in n8 tile j
      const int row0 = lane / 4;                     // + 8 * h + 16 * b: this lane's rows
      bool write_out = true;
      if (n_segs > 1) {
        float* part = scratch + static_cast<size_t>(strip * max_segs + seg) * (kMaxRows * 64);
#pragma unroll
        for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = b * 16 + h * 8 + row0;
            if (row < m) {
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                *reinterpret_cast<float2*>(part + row * 64 + 8 * j + 2 * (lane % 4)) =
                    make_float2(acc[b][j][2 * h], acc[b][j][2 * h + 1]);
              }
            }
          }
        __threadfence();
        __syncwarp();
        int arrived = 0;
        if (lane == 0) arrived = atomicAdd(locks + strip, 1);
        arrived = __shfl_sync(0xffffffffu, arrived, 0);
        write_out = arrived == n_segs - 1;
        if (write_out) {
          // Last to arrive: sum all segments in segment order (deterministic), own one from registers.
          __threadfence();
          // The group sums are zero after the final fold: reuse them as the total.
          for (int s = 0; s < n_segs; ++s) {
            const float* other = scratch + static_cast<size_t>(strip * max_segs + s) * (kMaxRows * 64);
#pragma unroll
            for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int row = b * 16 + h * 8 + row0;
                if (row < m) {
#pragma unroll
                  for (int j = 0; j < 8; ++j) {
                    float2 v;
                    if (s == seg) {
                      v = make_float2(acc[b][j][2 * h], acc[b][j][2 * h + 1]);
                    } else {
                      v = __ldcg(reinterpret_cast<const float2*>(other + row * 64 + 8 * j + 2 * (lane % 4)));
                    }
                    grp[b][j][2 * h] += v.x;
                    grp[b][j][2 * h + 1] += v.y;
                  }
                }
              }
          }
#pragma unroll
          for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                acc[b][j][e] = grp[b][j][e];
                grp[b][j][e] = 0.f;
              }
          if (lane == 0) locks[strip] = 0;  // leave the counter zero for the next launch
        }
      }
      if (write_out) {
#pragma unroll
        for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = b * 16 + h * 8 + row0;
            if (row < m) {
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                *reinterpret_cast<T2*>(c + static_cast<size_t>(row) * n + col + 8 * j) =
                    Tr::pack2(acc[b][j][2 * h], acc[b][j][2 * h + 1]);
              }
            }
          }
      }
    }
#pragma unroll
    for (int b = 0; b < M_BLOCKS; ++b)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[b][j][e] = 0.f;
  }
  cp_async_wait<0>();
}

// Pipeline depth: 8 stages keep 64 KB of weights in flight per SM, enough to cover HBM latency at full
// bandwidth on an H100 (about 3 TB/s x 2 us spread over 132 SMs is ~45 KB).
constexpr int kStages = 8;

struct Plan {
  int grid;            // thread blocks launched
  int tiles_per_cta;   // units of work per block
  int max_segs;        // segments any column block may be split into
};

Plan make_plan(int n, int k, int sms) {
  const int k_tiles = k / kTileK;
  const int n_blocks = (n + kTileN - 1) / kTileN;
  const int total = n_blocks * k_tiles;
  Plan p;
  p.tiles_per_cta = (total + sms - 1) / sms;
  p.grid = (total + p.tiles_per_cta - 1) / p.tiles_per_cta;
  p.max_segs = (k_tiles + p.tiles_per_cta - 1) / p.tiles_per_cta + 1;
  return p;
}

template <typename T, int M_BLOCKS>
int launch(const T* a, const int4* qweight, const T* scales, T* c, int* locks, float* scratch, int m, int n, int k,
           int lda, int group, int per_channel, const Plan& plan, cudaStream_t stream) {
  auto kernel = gemm_kernel<T, M_BLOCKS, kStages>;
  constexpr int smem = smem_bytes<M_BLOCKS, kStages>();
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return MARLIN_ERR_LAUNCH;
  }
  kernel<<<plan.grid, kThreads, smem, stream>>>(a, qweight, scales, c, locks, scratch, m, n, k, lda, group,
                                                 per_channel, plan.tiles_per_cta, plan.max_segs);
  return cudaGetLastError() == cudaSuccess ? MARLIN_OK : MARLIN_ERR_LAUNCH;
}

// Instantiated configurations: {fp16, bf16} x {one, two m16 row blocks}, all with kStages stages.
// Two row blocks bound the registers (running sum + group sum = 128 fp32 per thread) so that one
// 256-thread block per SM fits without spills; larger m is processed 32 rows per launch.
template <typename T>
int gemm_rows(const T* a, const int4* qweight, const T* scales, T* c, int* locks, float* scratch, int m, int n,
              int k, int lda, int group, int per_channel, const Plan& plan, cudaStream_t stream) {
  for (int m0 = 0; m0 < m; m0 += kMaxRows) {
    const int rows = m - m0 < kMaxRows ? m - m0 : kMaxRows;
    const T* a_rows = a + static_cast<size_t>(m0) * lda;
    T* c_rows = c + static_cast<size_t>(m0) * n;
    const int status =
        rows <= 16 ? launch<T, 1>(a_rows, qweight, scales, c_rows, locks, scratch, rows, n, k, lda, group,
                                  per_channel, plan, stream)
                   : launch<T, 2>(a_rows, qweight, scales, c_rows, locks, scratch, rows, n, k, lda, group,
                                  per_channel, plan, stream);
    if (status != MARLIN_OK) return status;
  }
  return MARLIN_OK;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace marlin

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
    default: return "unknown marlin status";
  }
}

size_t marlin_scratch_bytes(int n, int k, int sms) {
  if (n < 64 || k < 64 || sms < 1) return 0;
  const marlin::Plan p = marlin::make_plan(n, k, sms);
  return static_cast<size_t>(n / 64) * p.max_segs * marlin::kMaxRows * 64 * sizeof(float);
}

int marlin_gemm(const void* a, const int32_t* qweight, const void* scales, void* c, int32_t* locks, float* scratch,
                size_t scratch_bytes, int m, int n, int k, int lda, int group_size, int dtype, int sms,
                cudaStream_t stream) {
  if (m < 1) return MARLIN_ERR_M;
  if (k < 64 || k % 64 != 0) return MARLIN_ERR_K;
  if (n < 64 || n % 64 != 0) return MARLIN_ERR_N;
  const bool per_channel = group_size == -1;
  if (!(per_channel || group_size == 32 || group_size == 64 || group_size == 128) ||
      (!per_channel && k % group_size != 0)) {
    return MARLIN_ERR_GROUP;
  }
  if (dtype != MARLIN_FP16 && dtype != MARLIN_BF16) return MARLIN_ERR_DTYPE;
  if (!marlin::aligned16(a) || !marlin::aligned16(qweight) || !marlin::aligned16(scales) ||
      !marlin::aligned16(c) || lda % 8 != 0 || lda < k) {
    return MARLIN_ERR_ALIGN;
  }
  if (sms < 1) return MARLIN_ERR_SMS;
  if (scratch_bytes < marlin_scratch_bytes(n, k, sms)) return MARLIN_ERR_SCRATCH;
  const marlin::Plan plan = marlin::make_plan(n, k, sms);
  const int group = per_channel ? k : group_size;
  const int4* q = reinterpret_cast<const int4*>(qweight);
  if (dtype == MARLIN_FP16) {
    return marlin::gemm_rows(static_cast<const half*>(a), q, static_cast<const half*>(scales), static_cast<half*>(c),
                             locks, scratch, m, n, k, lda, group, per_channel ? 1 : 0, plan, stream);
  }
  return marlin::gemm_rows(static_cast<const __nv_bfloat16*>(a), q, static_cast<const __nv_bfloat16*>(scales),
                           static_cast<__nv_bfloat16*>(c), locks, scratch, m, n, k, lda, group, per_channel ? 1 : 0,
                           plan, stream);
}
