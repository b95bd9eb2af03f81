// Thin torch binding for the Marlin kernels: checks every tensor (device, dtype, contiguity, shape) before
// launch and turns the kernel's status codes into messages that carry m, n and k.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>

#include "marlin_kernel.h"

namespace {

std::string dims(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

int dtype_code(const torch::Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kHalf) return MARLIN_FP16;
  if (t.scalar_type() == torch::kBFloat16) return MARLIN_BF16;
  TORCH_CHECK(false, "marlin: ", name, " must be float16 or bfloat16, got ", t.scalar_type());
  return -1;
}

// Checks shared by gemm and dequantize; returns (k, n) of the packed matrix.
std::pair<int64_t, int64_t> check_weights(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size,
                                          const torch::Device& device) {
  TORCH_CHECK(qweight.device() == device, "marlin: qweight is on ", qweight.device(), ", expected ", device);
  TORCH_CHECK(scales.device() == device, "marlin: scales is on ", scales.device(), ", expected ", device);
  TORCH_CHECK(qweight.scalar_type() == torch::kInt, "marlin: qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "marlin: qweight must be a contiguous 2-D int32 [K/16, 2N], got ",
              dims(qweight));
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous(), "marlin: scales must be a contiguous 2-D tensor, got ",
              dims(scales));
  const int64_t k = qweight.size(0) * 16, n = qweight.size(1) / 2;
  TORCH_CHECK(qweight.size(1) % 2 == 0 && n % 64 == 0 && n > 0 && k % 64 == 0 && k > 0,
              "marlin: qweight ", dims(qweight), " does not pack a K x N matrix with K, N positive multiples of 64 (K=", k,
              ", N=", n, ")");
  TORCH_CHECK(group_size == -1 || group_size == 32 || group_size == 64 || group_size == 128,
              "marlin: group_size must be 32, 64, 128 or -1, got ", group_size);
  TORCH_CHECK(group_size == -1 || k % group_size == 0, "marlin: group_size ", group_size, " does not divide K=", k);
  const int64_t groups = group_size == -1 ? 1 : k / group_size;
  TORCH_CHECK(scales.size(0) == groups && scales.size(1) == n, "marlin: scales must be [", groups, ", ", n,
              "] for K=", k, ", N=", n, ", group_size=", group_size, "; got ", dims(scales));
  TORCH_CHECK(k <= INT32_MAX && n <= INT32_MAX, "marlin: K=", k, " or N=", n, " too large");
  return {k, n};
}

// c[m, n] = a[m, k] @ dequant(qweight, scales). locks: int32 [>= n/64], zero on entry, left zero.
torch::Tensor gemm(const torch::Tensor& a, const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size,
                   torch::Tensor& locks) {
  TORCH_CHECK(a.is_cuda(), "marlin: a must be a CUDA tensor, got device ", a.device());
  const int dtype = dtype_code(a, "a");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "marlin: a must be a contiguous 2-D [M, K] tensor, got ", dims(a),
              " (contiguous=", a.is_contiguous(), ")");
  const auto [k, n] = check_weights(qweight, scales, group_size, a.device());
  const int64_t m = a.size(0);
  TORCH_CHECK(a.size(1) == k, "marlin: a is ", dims(a), " but qweight ", dims(qweight), " packs K=", k, " (N=", n, ")");
  TORCH_CHECK(scales.scalar_type() == a.scalar_type(), "marlin: scales dtype ", scales.scalar_type(),
              " must match a's dtype ", a.scalar_type());
  TORCH_CHECK(locks.device() == a.device() && locks.scalar_type() == torch::kInt && locks.is_contiguous() &&
                  locks.numel() >= n / 64,
              "marlin: workspace must be a contiguous int32 tensor of at least N/64=", n / 64, " zeros on ",
              a.device(), ", got ", locks.scalar_type(), " ", dims(locks), " on ", locks.device());
  TORCH_CHECK(m <= INT32_MAX, "marlin: M=", m, " too large");
  const c10::cuda::CUDAGuard guard(a.device());
  auto c = torch::empty({m, n}, a.options());
  if (m == 0) return c;
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.get_device()) == cudaSuccess,
              "marlin: cannot query the multiprocessor count of ", a.device());
  const size_t scratch_bytes = marlin_scratch_bytes(static_cast<int>(n), static_cast<int>(k), sms);
  auto scratch = torch::empty({static_cast<int64_t>(scratch_bytes / sizeof(float)) + 1},
                              a.options().dtype(torch::kFloat));
  const int status = marlin_gemm(a.data_ptr(), qweight.data_ptr<int32_t>(), scales.data_ptr(), c.data_ptr(),
                                 locks.data_ptr<int32_t>(), scratch.data_ptr<float>(), scratch_bytes,
                                 static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(k),
                                 static_cast<int>(group_size), dtype, sms, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == MARLIN_OK, "marlin gemm (m=", m, ", n=", n, ", k=", k, ", group_size=", group_size,
              ") failed: ", marlin_status_string(status),
              status == MARLIN_ERR_LAUNCH ? std::string(" (") + cudaGetErrorString(cudaGetLastError()) + ")" : "");
  return c;
}

// Dense dequantized weights [k, n] in scales' dtype.
torch::Tensor dequantize(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size) {
  TORCH_CHECK(qweight.is_cuda(), "marlin: qweight must be a CUDA tensor, got device ", qweight.device());
  const int dtype = dtype_code(scales, "scales");
  const auto [k, n] = check_weights(qweight, scales, group_size, qweight.device());
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto out = torch::empty({k, n}, scales.options());
  const int status = marlin_dequantize(qweight.data_ptr<int32_t>(), scales.data_ptr(), out.data_ptr(),
                                       static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size), dtype,
                                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == MARLIN_OK, "marlin dequantize (n=", n, ", k=", k, ", group_size=", group_size,
              ") failed: ", marlin_status_string(status));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "C[M, N] = A[M, K] @ dequant(B); workspace int32 [N/64] zeros (left zero)");
  m.def("dequantize", &dequantize, "dense B [K, N] from Marlin-packed qweight and scales");
}
