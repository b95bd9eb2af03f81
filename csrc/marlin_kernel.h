// The Marlin FP16/BF16 x INT4 matrix product: C[m, n] = A[m, k] @ dequant(B)[k, n].
//
// Plain C interface over raw device pointers (no torch headers), so this file and marlin_kernel.cu build
// with nvcc alone. Every entry point returns a MarlinStatus code instead of throwing; the torch binding
// (marlin_binding.cpp) turns codes into messages.
//
// B is stored in the Marlin layout defined by gptq/format.py:
//   qweight  int32 [k/16, 2*n]: 16x16 tiles, each 16x64 strip reordered into mma B fragments per lane,
//            8 codes per int32 with nibble order 0,2,4,6,1,3,5,7; code q in 0..15, weight (q - 8) * s.
//   scales   [k/g, n] (or [1, n] per channel) in the activation dtype, columns permuted within runs of 64
//            (grouped) or 32 (per channel) as format.py documents.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// Result codes of the entry points below.
enum MarlinStatus : int {
  MARLIN_OK = 0,
  MARLIN_ERR_M = 1,        // m < 1
  MARLIN_ERR_K = 2,        // k < 64 or k % 64 != 0
  MARLIN_ERR_N = 3,        // n < 64 or n % 64 != 0
  MARLIN_ERR_GROUP = 4,    // group size not 32, 64, 128 or -1, or it does not divide k
  MARLIN_ERR_DTYPE = 5,    // dtype code not MARLIN_FP16 / MARLIN_BF16
  MARLIN_ERR_ALIGN = 6,    // a pointer not 16-byte aligned, or lda not a multiple of 8 or < k
  MARLIN_ERR_SCRATCH = 7,  // scratch buffer smaller than marlin_scratch_bytes()
  MARLIN_ERR_SMS = 8,      // sms < 1
  MARLIN_ERR_LAUNCH = 9,   // the CUDA runtime reported an error at launch (see cudaGetLastError)
  MARLIN_ERR_ARCH = 10,    // MARLIN_KERNEL_WGMMA asked for where it is not available (marlin_wgmma_available)
  MARLIN_ERR_KERNEL = 11,  // kernel choice not one of MarlinKernel
};

// Which fused kernel marlin_gemm runs.
enum MarlinKernel : int {
  MARLIN_KERNEL_AUTO = 0,   // the faster one for this device and m
  MARLIN_KERNEL_MMA = 1,    // the mma.sync kernel (sm_80+), any m
  MARLIN_KERNEL_WGMMA = 2,  // the Hopper wgmma kernel (sm_90 with an sm_90a build), any m
};

// Whether MARLIN_KERNEL_WGMMA can run on CUDA device `device`: its compute capability is 9.0 and this
// build holds sm_90a code. 0 or 1.
int marlin_wgmma_available(int device);

// Element type of activations, scales and output.
enum MarlinDtype : int { MARLIN_FP16 = 0, MARLIN_BF16 = 1 };

// The preconditions on the packed weights that every entry point below checks first (the binding too, to
// word its messages): MARLIN_ERR_K, _N, _GROUP or _DTYPE, else MARLIN_OK.
int marlin_check_weights(int n, int k, int group_size, int dtype);

// Human-readable name of a MarlinStatus.
const char* marlin_status_string(int status);

// Bytes of fp32 scratch that marlin_gemm needs for its split-k partial sums (m, n, k, dtype, sms as in
// marlin_gemm; enough for either kernel).
size_t marlin_scratch_bytes(int m, int n, int k, int dtype, int sms);

// C = A @ dequant(B), fp32 accumulation, on `stream`.
//   a        [m, lda] fp16/bf16, row-major, only the first k columns are read; 16-byte aligned
//   qweight  int32 [k/16, 2n] Marlin-packed codes; 16-byte aligned
//   scales   [k/g, n] or [1, n] (group_size == -1), dtype of a, Marlin-permuted; 16-byte aligned
//   c        [m, n] output, dtype of a; every element is written
//   scratch  fp32 buffer of at least scratch_bytes >= marlin_scratch_bytes(m, n, k, dtype, sms);
//            contents ignored;
//            no state is kept between calls (safe to capture in CUDA graphs)
//   sms      number of thread blocks to spread the work over (the device's multiprocessor count)
//   kernel   a MarlinKernel
int marlin_gemm(const void* a, const int32_t* qweight, const void* scales, void* c, float* scratch,
                size_t scratch_bytes, int m, int n, int k, int lda, int group_size, int dtype,
                int sms, int kernel, cudaStream_t stream);

// out[k, n] = dequant(B) in the activation dtype ((q - 8) * s computed in fp32, then rounded), natural
// row-major order (bit-identical to that definition). qweight, scales and out 16-byte aligned. Used for large m,
// where a dense matrix product beats the fused kernel.
int marlin_dequantize(const int32_t* qweight, const void* scales, void* out, int n, int k, int group_size,
                      int dtype, cudaStream_t stream);
