// Device helpers for the Marlin kernels: per-dtype traits (mma, 4-bit dequantization) and thin wrappers
// around the PTX instructions used (cp.async, ldmatrix). Nothing here knows the matrix layout.
//
// No L2 cache-policy hints (createpolicy / cp.async ... L2::cache_hint): they are an illegal instruction
// on the benchmark H100.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace marlin {

// 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global -> shared copy, bypassing L1.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

// As cp_async16, but with pred false nothing is read and the 16 bytes are zero-filled (src must still be a
// valid address).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

// 16-byte shared-memory load.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// 4- and 2-byte shared-memory loads.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint16_t lds16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}

// (a & b) | c in one LOP3 (the compiler splits it in two when b and c are both immediates).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Close the current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Programmatic dependent launch (sm_90+; no-ops before). A kernel launched with programmatic stream
// serialization may start while the previous kernel in the stream is still running: it must call
// grid_dependency_wait() before touching memory that kernel writes (or reads); everything before the wait
// may only read constant inputs. launch_dependents() lets the next kernel start its own early part.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Four 8x8 b16 matrices from shared memory: lane l gives the address of row (l % 8) of matrix (l / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Per-dtype operations. T is the activation/scale/output element type.
template <typename T>
struct Traits;

template <>
struct Traits<half> {
  using T2 = half2;

  // acc[4] += A(16x16, 4 regs) * B(16x8, 2 regs) on the tensor cores, fp32 accumulation.
  __device__ __forceinline__ static void mma(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }

  // One int32 of 8 interleaved codes -> the 4 B-fragment registers (q - 8 as fp16 pairs, exact):
  // out[0], out[1] = b0, b1 of n8 half 0; out[2], out[3] = b0, b1 of n8 half 1.
  // Codes OR-ed into the mantissa of 1024.0 give 1024 + q; nibbles at bits 4..7 give 1024 + 16q.
  __device__ __forceinline__ static void dequant(uint32_t q, uint32_t (&out)[4]) {
    constexpr uint32_t kLo = 0x000F000Fu, kHi = 0x00F000F0u, kExp = 0x64006400u;
    constexpr uint32_t kSubLo = 0x64086408u;  // 1032 = 1024 + 8
    constexpr uint32_t kMulHi = 0x2C002C00u;  // 1/16
    constexpr uint32_t kAddHi = 0xD480D480u;  // -72 = -(1024/16 + 8)
    const uint32_t shifted = q >> 8;
    const uint32_t lo0 = and_or(q, kLo, kExp), hi0 = and_or(q, kHi, kExp);
    const uint32_t lo1 = and_or(shifted, kLo, kExp), hi1 = and_or(shifted, kHi, kExp);
    asm("sub.f16x2 %0, %1, %2;\n" : "=r"(out[0]) : "r"(lo0), "r"(kSubLo));
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(out[1]) : "r"(hi0), "r"(kMulHi), "r"(kAddHi));
    asm("sub.f16x2 %0, %1, %2;\n" : "=r"(out[2]) : "r"(lo1), "r"(kSubLo));
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(out[3]) : "r"(hi1), "r"(kMulHi), "r"(kAddHi));
  }

  // As dequant, but every value carries a fixed offset instead of being exact q - 8, with no arithmetic
  // at all: out[0], out[2] (codes at bits 0..3: k rows 0..7 of the 16x16 tile) are 1024 + q = (q - 8) +
  // kLoOffset, OR-ed into the mantissa of 1024.0 (unit in the last place 1); out[1], out[3] (codes at bits
  // 4..7: k rows 8..15) are 64 + q = (q - 8) + kHiOffset, OR-ed into the mantissa of 64.0 (unit 1/16). Both
  // exact. The caller subtracts the offsets times the matching activation sums once per scale group (one
  // extra mma per k16 strip with the offset pairs as its operand). Four LOP3 and one shift per 8 codes
  // (dequant: seven). The offsets make the fp32 group sums up to ~130x larger than what they cancel to: in a
  // float32 simulation of g128 sums over k = 4096, ~2e-5 relative error, a tenth of the fp16 rounding of
  // the output (2-4e-4), also with activations of mean 3 or 10 or x50 outliers.
  static constexpr bool kHasOffset = true;
  static constexpr uint32_t kLoOffsetPair = 0x64086408u;  // 1032.0, 1032.0
  static constexpr uint32_t kHiOffsetPair = 0x54805480u;  // 72.0, 72.0
  __device__ __forceinline__ static void dequant_offset(uint32_t q, uint32_t (&out)[4]) {
    constexpr uint32_t kLo = 0x000F000Fu, kHi = 0x00F000F0u, kExpLo = 0x64006400u, kExpHi = 0x54005400u;
    const uint32_t shifted = q >> 8;
    out[0] = and_or(q, kLo, kExpLo);
    out[1] = and_or(q, kHi, kExpHi);
    out[2] = and_or(shifted, kLo, kExpLo);
    out[3] = and_or(shifted, kHi, kExpHi);
  }

  // Element-wise product of two fp16 pairs (rounded to fp16).
  __device__ __forceinline__ static uint32_t mul(uint32_t x, uint32_t y) {
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(x), "r"(y));
    return d;
  }

  __device__ __forceinline__ static float to_float(half x) { return __half2float(x); }
  __device__ __forceinline__ static half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static T2 pack2(float x, float y) { return __floats2half2_rn(x, y); }
};

template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;

  __device__ __forceinline__ static void mma(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }

  // Same contract as the fp16 version. bf16 has only 7 mantissa bits, so every nibble is shifted down to
  // bits 0..3 and OR-ed into 128.0 (giving 128 + q), then 136 is subtracted (exact): dequant_keep keeping both.
  __device__ __forceinline__ static void dequant(uint32_t q, uint32_t (&out)[4]) { dequant_keep(q, out, true, true); }

  __device__ __forceinline__ static uint32_t mul(uint32_t x, uint32_t y) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(y), "r"(0x80008000u));
    return d;
  }

  // dequant with a 0/1 factor per column of the pair (the wgmma kernel's zero-scale mask): out[0], out[1]
  // (nibbles 0, 1, 4, 5: the fragment's first column) are multiplied by keep0, out[2], out[3] by keep1, at no
  // cost (the same four FMAs: (128 + q) * keep - 136 * keep; 1.0 and -136 where kept).
  __device__ __forceinline__ static void dequant_keep(uint32_t q, uint32_t (&out)[4], bool keep0, bool keep1) {
    constexpr uint32_t kLo = 0x000F000Fu, kExp = 0x43004300u;
    const uint32_t one0 = keep0 ? 0x3F803F80u : 0u, one1 = keep1 ? 0x3F803F80u : 0u;
    const uint32_t minus0 = keep0 ? 0xC308C308u : 0u, minus1 = keep1 ? 0xC308C308u : 0u;  // -136 or 0
    const uint32_t v0 = and_or(q, kLo, kExp), v1 = and_or(q >> 4, kLo, kExp);
    const uint32_t v2 = and_or(q >> 8, kLo, kExp), v3 = and_or(q >> 12, kLo, kExp);
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(out[0]) : "r"(v0), "r"(one0), "r"(minus0));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(out[1]) : "r"(v1), "r"(one0), "r"(minus0));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(out[2]) : "r"(v2), "r"(one1), "r"(minus1));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(out[3]) : "r"(v3), "r"(one1), "r"(minus1));
  }

  // bf16 has no mantissa room for the nibble at bits 4..7 and no offset variant: dequant_offset is the exact
  // dequant (its four FMAs measured cheaper than an offset-correcting mma), and the offsets are zero.
  static constexpr bool kHasOffset = false;
  static constexpr uint32_t kLoOffsetPair = 0u;
  static constexpr uint32_t kHiOffsetPair = 0u;
  __device__ __forceinline__ static void dequant_offset(uint32_t q, uint32_t (&out)[4]) { dequant(q, out); }

  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static T2 pack2(float x, float y) { return __floats2bfloat162_rn(x, y); }
};

}  // namespace marlin
