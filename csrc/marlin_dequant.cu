// Dequantize a Marlin-packed matrix into a dense row-major [k, n] matrix in the activation dtype.
//
// Used for large m, where a dense tensor-core product (cuBLAS) on the dequantized weights can beat the fused
// kernel; the kernel is a pure stream (k n / 2 bytes in, 2 k n bytes out), so it should run at copy
// bandwidth. One warp handles one 16x64 strip: each lane turns its 16-byte vector (32 codes) into exact
// q - 8 pairs with the fused kernels' bit trick, multiplies them by their column scales in 16 bits (the
// product of two 16-bit values is exact in fp32, so this is (q - 8) * s rounded once, as the reference),
// scatters the 16-bit values into a padded shared-memory strip, and the warp writes the strip's 16 rows
// with 16-byte stores.
#include "marlin_kernel.h"
#include "marlin_layout.cuh"
#include "marlin_ptx.cuh"

namespace marlin {

constexpr int kDequantWarps = 8;    // strips per thread block
constexpr int kStripPitch = 144;    // bytes per shared row of 64 values: 128 + 16 keeps the scatter
                                    // conflict-free and the 16-byte reads aligned

template <typename T>           // half or __nv_bfloat16: element type of scales and out
__global__ void __launch_bounds__(kDequantWarps * 32)
    dequant_kernel(const int4* __restrict__ qweight,  // [k/16, n/2] packed codes as 16-byte vectors
                   const T* __restrict__ scales,      // [k/group, n] or [1, n], Marlin-permuted columns
                   T* __restrict__ out,               // [k, n] dense weights, row-major, 16-byte aligned
                   int n,                             // columns, multiple of 64
                   int k,                             // rows, multiple of 64
                   int group,                         // rows per scale group (k when per channel)
                   int per_channel) {                 // 1: scales use the per-channel permutation
  using Tr = Traits<T>;
  __shared__ __align__(16) uint8_t strip_smem[kDequantWarps][16 * kStripPitch];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_strips = n / 64;
  const int strip_id = blockIdx.x * kDequantWarps + warp;
  if (strip_id >= (k / 16) * n_strips) return;  // whole warp leaves together; no block barrier below
  const int r = strip_id / n_strips;  // k16 row of the strip
  const int s = strip_id % n_strips;  // 64-column strip
  const int4 v = __ldg(qweight + static_cast<size_t>(r) * (n / 2) + s * 32 + lane);
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
  // Lane (g, t) = (lane / 4, lane % 4) holds, for tile j (columns 16j..16j+15 of the strip), columns
  // 16j + g and 16j + g + 8 at k rows 2t, 2t+1, 2t+8, 2t+9. Scales of those 8 columns, as 16-bit pairs
  // (s, s): grouped layouts keep them at positions 8g .. 8g + 7 (column 16j + g at 8g + 2j, + 8 at 8g + 2j + 1),
  // one 16-byte load; per-channel ones are scattered (read once per strip, from L1).
  const T* srow = scales + static_cast<size_t>(per_channel ? 0 : (r * 16) / group) * n + s * 64;
  const int g = lane >> 2, t = lane & 3;
  uint32_t sp[8];  // sp[2j + h]: column 16j + g + 8h
  if (!per_channel) {
    const uint4 sv = __ldg(reinterpret_cast<const uint4*>(srow + 8 * g));
    const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sp[2 * i] = __byte_perm(sw[i], 0, 0x1010);      // low 16 bits twice
      sp[2 * i + 1] = __byte_perm(sw[i], 0, 0x3232);  // high 16 bits twice
    }
  } else {
    const uint16_t* s16 = reinterpret_cast<const uint16_t*>(srow);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t h = __ldg(s16 + scale_pos(16 * (i >> 1) + g + 8 * (i & 1), true));
      sp[i] = h * 0x10001u;
    }
  }
  const uint32_t base = smem_addr(strip_smem[warp]);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t wq[4];  // (rows 2t, 2t+1) col g; (2t+8, 2t+9) col g; (2t, 2t+1) col g+8; (2t+8, 2t+9) col g+8
    Tr::dequant(words[j], wq);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t x = Tr::mul(wq[e], sp[2 * j + (e >> 1)]);
      const int row = 2 * t + 8 * (e & 1), col = 16 * j + g + 8 * (e >> 1);
      const uint32_t addr = base + row * kStripPitch + col * 2;
      asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr), "h"(static_cast<uint16_t>(x & 0xFFFFu)));
      asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr + kStripPitch), "h"(static_cast<uint16_t>(x >> 16)));
    }
  }
  __syncwarp();
  // Rows lane / 8 + 4i, 16-byte chunk lane % 8: each quarter warp writes one row's 128 bytes.
  const int chunk = lane & 7;
  T* dst = out + static_cast<size_t>(r) * 16 * n + s * 64 + chunk * 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (lane >> 3) + 4 * i;
    const uint4 x = lds128(base + row * kStripPitch + chunk * 16);
    *reinterpret_cast<uint4*>(dst + static_cast<size_t>(row) * n) = x;
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
  const int weights = marlin_check_weights(n, k, group_size, dtype);
  if (weights != MARLIN_OK) return weights;
  const bool per_channel = group_size == -1;
  if ((reinterpret_cast<uintptr_t>(qweight) & 15) != 0 || (reinterpret_cast<uintptr_t>(scales) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(out) & 15) != 0) {
    return MARLIN_ERR_ALIGN;
  }
  const int group = per_channel ? k : group_size;
  const int4* q = reinterpret_cast<const int4*>(qweight);
  if (dtype == MARLIN_FP16) {
    return marlin::launch_dequant(q, static_cast<const half*>(scales), static_cast<half*>(out), n, k, group,
                                  per_channel ? 1 : 0, stream);
  }
  return marlin::launch_dequant(q, static_cast<const __nv_bfloat16*>(scales), static_cast<__nv_bfloat16*>(out), n,
                                k, group, per_channel ? 1 : 0, stream);
}
