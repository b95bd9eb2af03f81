// Internal interface of the Hopper (sm_90a) fused kernel in marlin_wgmma.cu, used by marlin_gemm's
// dispatch in marlin_kernel.cu. Same operands and contract as marlin_gemm (marlin_kernel.h); arguments are
// validated there.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace marlin {
namespace sm90 {

// Whether this build holds the sm_90a code of the kernel (the extension was compiled for arch 9.0a with
// MARLIN_SM90A defined); when false, gemm() returns MARLIN_ERR_ARCH.
bool compiled();

// Bytes of fp32 scratch gemm() needs for its split-k partial sums on this problem (0: none).
size_t scratch_bytes(int m, int n, int k, int dtype, int sms);

// C = A @ dequant(B) with warpgroup MMAs (wgmma): any m, any n, k, group size marlin_gemm accepts.
int gemm(const void* a, const int4* qweight, const void* scales, void* c, float* scratch, size_t scratch_bytes,
         int m, int n, int k, int lda, int group, int per_channel, int dtype, int sms, bool pdl,
         cudaStream_t stream);

}  // namespace sm90
}  // namespace marlin
