// Hopper (sm_90a) warpgroup MMA wrappers for the wgmma kernel (marlin_wgmma_tma.cuh): wgmma.mma_async with the
// A operand in registers and B in shared memory, its fences, the shared-memory matrix descriptor, and the
// accumulator helpers (scale fold, epilogue) of the wgmma C-fragment layout.
// Only valid in device code compiled for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); callers guard their use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "marlin_ptx.cuh"

namespace marlin {
namespace sm90 {

// bf16 row tiles up to this many rows fold fp32 group sums into the running sum (two accumulator sets; 128
// rows then take two consumer warpgroups); larger ones rescale one set (marlin_wgmma_tma.cuh, kFold).
constexpr int kBf16FoldMaxRows = 128;

// Descriptor of a K-major B operand in shared memory with the 128-byte swizzle: rows of 64 16-bit elements
// (128 bytes), 8-row atoms of 1024 bytes in which 16-byte chunk c of row r sits at chunk c ^ (r % 8).
// `addr` is the 32-bit shared address of the k16 slice's first row (atom base + 32 bytes per k16 step; the
// atom base must be 1024-byte aligned). Leading byte offset: unused for this layout (1); stride byte
// offset: 1024 (next 8 rows); swizzle mode 1 (128 B) in bits 62-63.
__device__ __forceinline__ uint64_t smem_desc_k128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// Order this warpgroup's register accesses before the next wgmma.mma_async (required before the first
// one and whenever its A or accumulator registers were written by other instructions).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Close the group of wgmma.mma_async issued since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keep the compiler from moving accesses of accumulator registers across a wgmma fence or wait.
template <int R>
__device__ __forceinline__ void fence_registers(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Make this thread's completed generic-proxy writes to shared memory (cp.async) visible to the async proxy
// (wgmma operand reads); a block barrier must follow before other warps' wgmma read them.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// d[64 x N] (+)= A[64 x 16] * B[16 x N], fp32 accumulators in the wgmma C-fragment layout (warp w of the
// warpgroup holds rows 16w..16w+15: element 4q + 2h + e is row 16w + lane/4 + 8h, column 8q + 2(lane%4) + e).
// a: this thread's mma.m16n8k16-style A fragment of its warp's 16 rows; desc_b: smem_desc_k128 of B;
// scale_d = 0 overwrites d (d = A * B).
template <typename T, int N>
__device__ void wgmma_m64k16(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d);

// One definition per N (the operand list), for element type T with PTX type name PTX.
#define MARLIN_DEFINE_WGMMA_N16(T, PTX)                                                                     \
  template <>                                                                                               \
  __device__ __forceinline__ void wgmma_m64k16<T, 16>(float(&d)[8], const uint32_t(&a)[4], uint64_t desc_b, \
                                                   int scale_d) {                                           \
    asm volatile(                                                                                           \
        "{\n.reg .pred p;\n"                                                                                \
        "setp.ne.b32 p, %12, 0;\n"                                                                          \
        "wgmma.mma_async.sync.aligned.m64n16k16.f32." PTX "." PTX " {"                                      \
        "%0,%1,%2,%3,%4,%5,%6,%7"                                                                           \
        "}, {%8,%9,%10,%11}, %13, p, 1, 1, 0;\n}\n"                                                         \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])    \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc_b));                           \
  }

#define MARLIN_DEFINE_WGMMA_N32(T, PTX)                                                                        \
  template <>                                                                                                  \
  __device__ __forceinline__ void wgmma_m64k16<T, 32>(float(&d)[16], const uint32_t(&a)[4], uint64_t desc_b,   \
                                                   int scale_d) {                                              \
    asm volatile(                                                                                              \
        "{\n.reg .pred p;\n"                                                                                   \
        "setp.ne.b32 p, %20, 0;\n"                                                                             \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX "." PTX " {"                                         \
        "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"                                                \
        "}, {%16,%17,%18,%19}, %21, p, 1, 1, 0;\n}\n"                                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),      \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc_b));                              \
  }

#define MARLIN_DEFINE_WGMMA_N64(T, PTX)                                                                           \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64k16<T, 64>(float(&d)[32], const uint32_t(&a)[4], uint64_t desc_b,      \
                                                   int scale_d) {                                                 \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\n"                                                                                      \
        "setp.ne.b32 p, %36, 0;\n"                                                                                \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                            \
        "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                  \
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                         \
        "}, {%32,%33,%34,%35}, %37, p, 1, 1, 0;\n}\n"                                                             \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc_b));                                 \
  }

#define MARLIN_DEFINE_WGMMA_N128(T, PTX)                                                                          \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64k16<T, 128>(float(&d)[64], const uint32_t(&a)[4], uint64_t desc_b,     \
                                                   int scale_d) {                                                 \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\n"                                                                                      \
        "setp.ne.b32 p, %68, 0;\n"                                                                                \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                           \
        "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                  \
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                                        \
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                                        \
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"                                         \
        "}, {%64,%65,%66,%67}, %69, p, 1, 1, 0;\n}\n"                                                             \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc_b));                                 \
  }

#define MARLIN_DEFINE_WGMMA_N256(T, PTX)                                                                                  \
  template <>                                                                                                             \
  __device__ __forceinline__ void wgmma_m64k16<T, 256>(float(&d)[128], const uint32_t(&a)[4], uint64_t desc_b,            \
                                                   int scale_d) {                                                         \
    asm volatile(                                                                                                         \
        "{\n.reg .pred p;\n"                                                                                              \
        "setp.ne.b32 p, %132, 0;\n"                                                                                       \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX "." PTX " {"                                                   \
        "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                          \
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                                                \
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                                                \
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"                                                \
        "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"                                                \
        "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"                                                \
        "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"                                    \
        "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"                                 \
        "}, {%128,%129,%130,%131}, %133, p, 1, 1, 0;\n}\n"                                                                \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                 \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),           \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),         \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),         \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),         \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),         \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),         \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),         \
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),         \
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),         \
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),         \
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),         \
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),     \
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])  \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc_b));                                         \
  }

// Instantiated shapes: every row tile the kernel uses, 16..256 rows, both dtypes.
MARLIN_DEFINE_WGMMA_N16(half, "f16")
MARLIN_DEFINE_WGMMA_N16(__nv_bfloat16, "bf16")
MARLIN_DEFINE_WGMMA_N32(half, "f16")
MARLIN_DEFINE_WGMMA_N32(__nv_bfloat16, "bf16")
MARLIN_DEFINE_WGMMA_N64(half, "f16")
MARLIN_DEFINE_WGMMA_N64(__nv_bfloat16, "bf16")
MARLIN_DEFINE_WGMMA_N128(half, "f16")
MARLIN_DEFINE_WGMMA_N128(__nv_bfloat16, "bf16")
MARLIN_DEFINE_WGMMA_N256(half, "f16")
MARLIN_DEFINE_WGMMA_N256(__nv_bfloat16, "bf16")

// ---- The accumulators of one warpgroup's 64 x MT slice of C^T (element 4q + 2h + e of a thread's registers:
// row 16 warp + lane/4 + 8h of C^T, i.e. column col0 + 8h of the strip, and column 8q + 2 (lane % 4) + e of
// C^T, i.e. row 8q + 2 (lane % 4) + e of the row tile) ----

// acc = s * src (ADD false) or acc += s * src (ADD true), s0 for the thread's first column (h = 0), s1 for
// its second (h = 1): the scale of a group or a channel applied to fp32 sums.
template <bool ADD, int R>
__device__ __forceinline__ void scale_fold(float (&acc)[R], const float (&src)[R], float s0, float s1) {
#pragma unroll
  for (int q = 0; q < R / 4; ++q) {
    if constexpr (ADD) {
      acc[4 * q + 0] += s0 * src[4 * q + 0], acc[4 * q + 1] += s0 * src[4 * q + 1];
      acc[4 * q + 2] += s1 * src[4 * q + 2], acc[4 * q + 3] += s1 * src[4 * q + 3];
    } else {
      acc[4 * q + 0] = s0 * src[4 * q + 0], acc[4 * q + 1] = s0 * src[4 * q + 1];
      acc[4 * q + 2] = s1 * src[4 * q + 2], acc[4 * q + 3] = s1 * src[4 * q + 3];
    }
  }
}

// Store four 8 x 8 matrices of 16-bit elements transposed (stmatrix .trans): register i of this thread holds
// elements (lane / 4, 2 (lane % 4) + {0, 1}) of matrix i in the mma C-fragment layout; lane 8 i + j gives the
// shared address of row j of the stored transpose of matrix i (16 bytes).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// The end of a segment that is a whole unit: this warp's 16 columns of C (`col`: the first; rows m0.., rows past m
// not written), ROWS rows at a time through the warp's own buffer `buf` in shared memory (ROWS x 32 bytes, 16-byte
// chunk c of row r at chunk c ^ ((r / 4) % 2), so that neither the stmatrix writes nor the row reads conflict),
// then 16-byte stores, two per row: each a whole 32-byte sector. Per thread MT / 16 stmatrix and MT / 16 vector
// stores for the MT / 2 2-byte stores that the fragments would take directly (each touching half of a sector); no
// barrier but the warp's own.
template <typename T, int MT, int ROWS>
__device__ __forceinline__ void store_unit(const float (&acc)[MT / 2], T* __restrict__ c, uint32_t buf, int m, int n,
                                          int m0, int col, int lane) {
  static_assert(MT % ROWS == 0 && ROWS % 16 == 0, "passes of whole stmatrix.x4 (16 rows)");
  const int j = lane & 7, i = lane >> 3;  // this lane addresses row j of matrix i: (q + i / 2, h = i % 2)
#pragma unroll
  for (int pass = 0; pass < MT / ROWS; ++pass) {
#pragma unroll
    for (int q = pass * ROWS / 8; q < (pass + 1) * ROWS / 8; q += 2) {
      uint32_t r[4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int e0 = 4 * (q + mi / 2) + 2 * (mi % 2);
        const typename Traits<T>::T2 v = Traits<T>::pack2(acc[e0], acc[e0 + 1]);
        r[mi] = *reinterpret_cast<const uint32_t*>(&v);
      }
      const int row = 8 * (q + i / 2) + j - pass * ROWS;
      stmatrix_x4_trans(buf + row * 32 + (((i & 1) ^ (j >> 2)) << 4), r);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < ROWS / 16; ++it) {
      const int row = 16 * it + (lane >> 1), chunk = lane & 1, grow = m0 + pass * ROWS + row;
      const uint4 v = lds128(buf + row * 32 + ((chunk ^ ((row >> 2) & 1)) << 4));
      if (grow < m) *reinterpret_cast<uint4*>(c + static_cast<size_t>(grow) * n + col + chunk * 8) = v;
    }
    __syncwarp();  // the buffer is read before the next pass (or unit) writes it
  }
}

// The end of a segment that is part of a unit: its fp32 sums to the block's scratch slot `slot` ([MT][64 WG]
// fp32, the warpgroup's 64 columns at wg 64), for the segment-sum kernel. Rows past m are not written.
template <int MT, int WG>
__device__ __forceinline__ void store_partial(const float (&acc)[MT / 2], float* __restrict__ slot, int m, int m0,
                                              int wg, int lane, int col0) {
  const int row0 = 2 * (lane & 3);
#pragma unroll
  for (int q = 0; q < MT / 8; ++q)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = row0 + 8 * q + e;
      if (m0 + r < m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) slot[r * (64 * WG) + wg * 64 + col0 + 8 * h] = acc[4 * q + 2 * h + e];
      }
    }
}

}  // namespace sm90
}  // namespace marlin
