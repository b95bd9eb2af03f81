// Dequantize a Marlin-packed matrix into a dense row-major [k, n] matrix in the activation dtype.
//
// Used for large m, where a dense tensor-core product (cuBLAS) on the dequantized weights is faster than
// the fused kernel. One warp handles one 16x64 strip: each lane unpacks its 32 codes into shared memory
// at their natural (row, column) places, then the warp writes 16 rows of 64 values with coalesced stores.
#include "marlin_kernel.h"
#include "marlin_ptx.cuh"

namespace marlin {

constexpr int kDequantWarps = 8;  // strips per thread block

template <typename T>           // half or __nv_bfloat16: element type of scales and out
__global__ void __launch_bounds__(kDequantWarps * 32)
    dequant_kernel(const int4* __restrict__ qweight,  // [k/16, n/2] packed codes as 16-byte vectors
                   const T* __restrict__ scales,      // [k/group, n] or [1, n], Marlin-permuted columns
                   T* __restrict__ out,               // [k, n] dense weights, row-major
                   int n,                             // columns, multiple of 64
                   int k,                             // rows, multiple of 64
                   int group,                         // rows per scale group (k when per channel)
                   int per_channel) {                 // 1: scales use the per-channel permutation
  using Tr = Traits<T>;
  __shared__ uint8_t codes[kDequantWarps][16][64];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_strips = n / 64;
  const int strip_id = blockIdx.x * kDequantWarps + warp;
  if (strip_id >= (k / 16) * n_strips) return;  // whole warp leaves together; no block barrier below
  const int r = strip_id / n_strips;   // k16 row of the strip
  const int s = strip_id % n_strips;   // 64-column strip
  const int4 v = qweight[static_cast<size_t>(r) * (n / 2) + s * 32 + lane];
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
  // Nibble p of word j holds code number order[p] of the lane's 8 codes of 16x16 tile j; code number i is
  // (half i / 4, k offset (2(lane%4), +1, +8, +9)[i % 4]), column lane/4 + 8 * half within the tile.
  constexpr int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  const int kbase = 2 * (lane % 4);
  const int kofs[4] = {kbase, kbase + 1, kbase + 8, kbase + 9};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      const int i = order[p];
      const int col = 16 * j + lane / 4 + 8 * (i / 4);
      codes[warp][kofs[i % 4]][col] = static_cast<uint8_t>((words[j] >> (4 * p)) & 0xF);
    }
  }
  __syncwarp();
  // Lane handles natural columns 2*lane, 2*lane+1 of the strip. Find their packed scale positions.
  int pos[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int cn = 2 * lane + e;
    if (per_channel) {
      const int c32 = cn % 32;  // position 8i + jj holds column 2i + (0,1,8,9,16,17,24,25)[jj]
      pos[e] = (cn / 32) * 32 + 8 * ((c32 % 8) / 2) + 2 * (c32 / 8) + (c32 % 2);
    } else {
      pos[e] = 8 * (cn % 8) + cn / 8;  // position 8i + j holds column 8j + i
    }
  }
  for (int kk = 0; kk < 16; ++kk) {
    const int row = r * 16 + kk;
    const T* srow = scales + static_cast<size_t>(per_channel ? 0 : row / group) * n + s * 64;
    const float s0 = Tr::to_float(srow[pos[0]]);
    const float s1 = Tr::to_float(srow[pos[1]]);
    const float w0 = (static_cast<float>(codes[warp][kk][2 * lane]) - 8.f) * s0;
    const float w1 = (static_cast<float>(codes[warp][kk][2 * lane + 1]) - 8.f) * s1;
    *reinterpret_cast<typename Tr::T2*>(out + static_cast<size_t>(row) * n + s * 64 + 2 * lane) = Tr::pack2(w0, w1);
  }
}

template <typename T>
int launch_dequant(const int4* qweight, const T* scales, T* out, int n, int k, int group, int per_channel,
                   cudaStream_t stream) {
  const int strips = (k / 16) * (n / 64);
  const int blocks = (strips + kDequantWarps - 1) / kDequantWarps;
  dequant_kernel<T><<<blocks, kDequantWarps * 32, 0, stream>>>(qweight, scales, out, n, k, group, per_channel);
  return cudaGetLastError() == cudaSuccess ? MARLIN_OK : MARLIN_ERR_LAUNCH;
}

}  // namespace marlin

int marlin_dequantize(const int32_t* qweight, const void* scales, void* out, int n, int k, int group_size, int dtype,
                      cudaStream_t stream) {
  if (k < 64 || k % 64 != 0) return MARLIN_ERR_K;
  if (n < 64 || n % 64 != 0) return MARLIN_ERR_N;
  const bool per_channel = group_size == -1;
  if (!(per_channel || group_size == 32 || group_size == 64 || group_size == 128) ||
      (!per_channel && k % group_size != 0)) {
    return MARLIN_ERR_GROUP;
  }
  if ((reinterpret_cast<uintptr_t>(qweight) & 15) != 0 || (reinterpret_cast<uintptr_t>(out) & 3) != 0) {
    return MARLIN_ERR_ALIGN;
  }
  const int group = per_channel ? k : group_size;
  const int4* q = reinterpret_cast<const int4*>(qweight);
  if (dtype == MARLIN_FP16) {
    return marlin::launch_dequant(q, static_cast<const half*>(scales), static_cast<half*>(out), n, k, group,
                                  per_channel ? 1 : 0, stream);
  }
  if (dtype == MARLIN_BF16) {
    return marlin::launch_dequant(q, static_cast<const __nv_bfloat16*>(scales), static_cast<__nv_bfloat16*>(out),
                                  n, k, group, per_channel ? 1 : 0, stream);
  }
  return MARLIN_ERR_DTYPE;
}
