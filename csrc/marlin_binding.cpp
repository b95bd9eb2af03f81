// Thin torch binding for the Marlin kernels: checks every tensor (device, dtype, contiguity, shape) before
// launch and turns the kernel's status codes into messages that carry m, n and k.
//
// Errors are returned, not thrown: every function returns (result, error kind, message) and the Python
// wrapper (gptq/kernel.py) raises. (A C++ exception crossing this extension's boundary crashed the
// interpreter with the torch build on the GPU machine.)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "marlin_kernel.h"

namespace {

enum ErrorKind : int { kOk = 0, kValueError = 1, kRuntimeError = 2 };
using Result = std::tuple<torch::Tensor, int, std::string>;

Result value_error(const std::string& message) { return {torch::Tensor(), kValueError, message}; }

std::string dims(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// MARLIN_FP16 / MARLIN_BF16, or -1.
int dtype_code(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kHalf) return MARLIN_FP16;
  if (t.scalar_type() == torch::kBFloat16) return MARLIN_BF16;
  return -1;
}

// Checks shared by gemm and dequantize: "" when qweight / scales pack a valid K x N matrix on `device`.
std::string check_weights(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size,
                          const torch::Device& device, int64_t& k, int64_t& n) {
  if (qweight.device() != device) return c10::str("marlin: qweight is on ", qweight.device(), ", expected ", device);
  if (scales.device() != device) return c10::str("marlin: scales is on ", scales.device(), ", expected ", device);
  if (qweight.scalar_type() != torch::kInt) return c10::str("marlin: qweight must be int32, got ", qweight.scalar_type());
  if (qweight.dim() != 2 || !qweight.is_contiguous()) {
    return c10::str("marlin: qweight must be a contiguous 2-D int32 [K/16, 2N], got ", dims(qweight));
  }
  if (scales.dim() != 2 || !scales.is_contiguous()) {
    return c10::str("marlin: scales must be a contiguous 2-D tensor, got ", dims(scales));
  }
  k = qweight.size(0) * 16;
  n = qweight.size(1) / 2;
  if (qweight.size(1) % 2 != 0 || n % 64 != 0 || n == 0 || k % 64 != 0 || k == 0) {
    return c10::str("marlin: qweight ", dims(qweight), " does not pack a K x N matrix with K, N positive multiples ",
                    "of 64 (K=", k, ", N=", n, ")");
  }
  if (group_size != -1 && group_size != 32 && group_size != 64 && group_size != 128) {
    return c10::str("marlin: group_size must be 32, 64, 128 or -1, got ", group_size);
  }
  if (group_size != -1 && k % group_size != 0) return c10::str("marlin: group_size ", group_size, " does not divide K=", k);
  const int64_t groups = group_size == -1 ? 1 : k / group_size;
  if (scales.size(0) != groups || scales.size(1) != n) {
    return c10::str("marlin: scales must be [", groups, ", ", n, "] for K=", k, ", N=", n, ", group_size=", group_size,
                    "; got ", dims(scales));
  }
  if (dtype_code(scales) < 0) return c10::str("marlin: scales must be float16 or bfloat16, got ", scales.scalar_type());
  if (k > INT32_MAX || n > INT32_MAX) return c10::str("marlin: K=", k, " or N=", n, " too large");
  return "";
}

// c[m, n] = a[m, k] @ dequant(qweight, scales). workspace: int32 [>= n/64], zero on entry, left zero.
Result gemm(const torch::Tensor& a, const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size,
            const torch::Tensor& workspace) {
  if (!a.is_cuda()) return value_error(c10::str("marlin: a must be a CUDA tensor, got device ", a.device()));
  const int dtype = dtype_code(a);
  if (dtype < 0) return value_error(c10::str("marlin: a must be float16 or bfloat16, got ", a.scalar_type()));
  if (a.dim() != 2 || !a.is_contiguous()) {
    return value_error(c10::str("marlin: a must be a contiguous 2-D [M, K] tensor, got ", dims(a),
                                " (contiguous=", a.is_contiguous(), ")"));
  }
  int64_t k = 0, n = 0;
  const std::string err = check_weights(qweight, scales, group_size, a.device(), k, n);
  if (!err.empty()) return value_error(err);
  const int64_t m = a.size(0);
  if (a.size(1) != k) {
    return value_error(c10::str("marlin: a is ", dims(a), " but qweight ", dims(qweight), " packs K=", k, " (N=", n, ")"));
  }
  if (scales.scalar_type() != a.scalar_type()) {
    return value_error(c10::str("marlin: scales dtype ", scales.scalar_type(), " must match a's dtype ",
                                a.scalar_type(), " (m=", m, ", n=", n, ", k=", k, ")"));
  }
  if (workspace.device() != a.device() || workspace.scalar_type() != torch::kInt || !workspace.is_contiguous() ||
      workspace.numel() < n / 64) {
    return value_error(c10::str("marlin: workspace must be a contiguous int32 tensor of at least N/64=", n / 64,
                                " zeros on ", a.device(), ", got ", workspace.scalar_type(), " ", dims(workspace),
                                " on ", workspace.device()));
  }
  if (m > INT32_MAX) return value_error(c10::str("marlin: M=", m, " too large"));
  const c10::cuda::CUDAGuard guard(a.device());
  auto c = torch::empty({m, n}, a.options());
  if (m == 0) return {c, kOk, ""};
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.get_device()) != cudaSuccess) {
    return {torch::Tensor(), kRuntimeError, c10::str("marlin: cannot query the multiprocessor count of ", a.device())};
  }
  const size_t scratch_bytes = marlin_scratch_bytes(static_cast<int>(n), static_cast<int>(k), sms);
  auto scratch =
      torch::empty({static_cast<int64_t>(scratch_bytes / sizeof(float)) + 1}, a.options().dtype(torch::kFloat));
  const int status = marlin_gemm(a.data_ptr(), qweight.data_ptr<int32_t>(), scales.data_ptr(), c.data_ptr(),
                                 const_cast<int32_t*>(workspace.data_ptr<int32_t>()), scratch.data_ptr<float>(),
                                 scratch_bytes, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                 static_cast<int>(k), static_cast<int>(group_size), dtype, sms,
                                 c10::cuda::getCurrentCUDAStream());
  if (status != MARLIN_OK) {
    return {torch::Tensor(), status == MARLIN_ERR_LAUNCH ? kRuntimeError : kValueError,
            c10::str("marlin gemm (m=", m, ", n=", n, ", k=", k, ", group_size=", group_size, ") failed: ",
                     marlin_status_string(status),
                     status == MARLIN_ERR_LAUNCH ? c10::str(" (", cudaGetErrorString(cudaGetLastError()), ")") : "")};
  }
  return {c, kOk, ""};
}

// Dense dequantized weights [k, n] in scales' dtype.
Result dequantize(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size) {
  if (!qweight.is_cuda()) return value_error(c10::str("marlin: qweight must be a CUDA tensor, got ", qweight.device()));
  int64_t k = 0, n = 0;
  const std::string err = check_weights(qweight, scales, group_size, qweight.device(), k, n);
  if (!err.empty()) return value_error(err);
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto out = torch::empty({k, n}, scales.options());
  const int status = marlin_dequantize(qweight.data_ptr<int32_t>(), scales.data_ptr(), out.data_ptr(),
                                       static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
                                       dtype_code(scales), c10::cuda::getCurrentCUDAStream());
  if (status != MARLIN_OK) {
    return {torch::Tensor(), status == MARLIN_ERR_LAUNCH ? kRuntimeError : kValueError,
            c10::str("marlin dequantize (n=", n, ", k=", k, ", group_size=", group_size,
                     ") failed: ", marlin_status_string(status))};
  }
  return {out, kOk, ""};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "(C[M, N] = A[M, K] @ dequant(B), error kind, message); workspace int32 [N/64] zeros");
  m.def("dequantize", &dequantize, "(dense B [K, N], error kind, message) from Marlin-packed qweight and scales");
}
