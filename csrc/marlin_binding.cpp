// Thin torch binding for the Marlin kernels: checks every tensor (device, dtype, contiguity, shape) before
// launch and turns the kernel's status codes into messages that carry m, n and k.
//
// Errors are returned, not thrown: every function returns (result, error kind, message) and the Python
// wrapper (gptq/kernel.py) raises ValueError / RuntimeError. Messages are formatted with snprintf. On the
// GPU machine (torch 2.11 + CUDA 13, its g++) any message built with c10::str / TORCH_CHECK (i.e. through
// std::ostringstream) segfaulted the interpreter; the cause was not pinned down, this avoids the path.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <tuple>

#include "marlin_kernel.h"

namespace {

enum ErrorKind : int { kOk = 0, kValueError = 1, kRuntimeError = 2 };
using Result = std::tuple<torch::Tensor, int, std::string>;

Result value_error(const std::string& message) { return {torch::Tensor(), kValueError, message}; }

// printf-style message (see the note at the top about c10::str).
template <typename... Args>
std::string msg(const char* format, Args... args) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), format, args...);
  return std::string(buf);
}

std::string dims(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += msg(i ? ", %lld" : "%lld", static_cast<long long>(t.size(i)));
  return s + "]";
}

std::string dev(const torch::Device& d) {
  return d.is_cuda() ? msg("cuda:%d", static_cast<int>(d.index())) : std::string(d.is_cpu() ? "cpu" : "other");
}

const char* type_name(const torch::Tensor& t) { return c10::toString(t.scalar_type()); }

// MARLIN_FP16 / MARLIN_BF16, or -1.
int dtype_code(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kHalf) return MARLIN_FP16;
  if (t.scalar_type() == torch::kBFloat16) return MARLIN_BF16;
  return -1;
}

// Checks shared by gemm and dequantize: "" when qweight / scales pack a valid K x N matrix on `device`.
std::string check_weights(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size,
                          const torch::Device& device, int64_t& k, int64_t& n) {
  using ll = long long;
  if (qweight.device() != device) {
    return msg("marlin: qweight is on %s, expected %s", dev(qweight.device()).c_str(), dev(device).c_str());
  }
  if (scales.device() != device) {
    return msg("marlin: scales is on %s, expected %s", dev(scales.device()).c_str(), dev(device).c_str());
  }
  if (qweight.scalar_type() != torch::kInt) return msg("marlin: qweight must be int32, got %s", type_name(qweight));
  if (qweight.dim() != 2 || !qweight.is_contiguous()) {
    return msg("marlin: qweight must be a contiguous 2-D int32 [K/16, 2N], got %s", dims(qweight).c_str());
  }
  if (scales.dim() != 2 || !scales.is_contiguous()) {
    return msg("marlin: scales must be a contiguous 2-D tensor, got %s", dims(scales).c_str());
  }
  k = qweight.size(0) * 16;
  n = qweight.size(1) / 2;
  if (k > INT32_MAX || n > INT32_MAX) return msg("marlin: K=%lld or N=%lld too large", static_cast<ll>(k), static_cast<ll>(n));
  if (dtype_code(scales) < 0) return msg("marlin: scales must be float16 or bfloat16, got %s", type_name(scales));
  // The kernels' own preconditions on K, N and the group size (marlin_check_weights), worded here.
  const int status = group_size < INT32_MIN || group_size > INT32_MAX
                         ? MARLIN_ERR_GROUP
                         : marlin_check_weights(static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
                                                dtype_code(scales));
  if (qweight.size(1) % 2 != 0 || status == MARLIN_ERR_K || status == MARLIN_ERR_N) {
    return msg("marlin: qweight %s does not pack a K x N matrix with K, N positive multiples of 64 (K=%lld, N=%lld)",
               dims(qweight).c_str(), static_cast<ll>(k), static_cast<ll>(n));
  }
  if (status != MARLIN_OK) {
    return msg("marlin: %s; got group_size %lld for K=%lld", marlin_status_string(status), static_cast<ll>(group_size),
               static_cast<ll>(k));
  }
  const int64_t groups = group_size == -1 ? 1 : k / group_size;
  if (scales.size(0) != groups || scales.size(1) != n) {
    return msg("marlin: scales must be [%lld, %lld] for K=%lld, N=%lld, group_size=%lld; got %s", static_cast<ll>(groups),
               static_cast<ll>(n), static_cast<ll>(k), static_cast<ll>(n), static_cast<ll>(group_size),
               dims(scales).c_str());
  }
  return "";
}

// c[m, n] = a[m, k] @ dequant(qweight, scales).
// kernel: a MarlinKernel (auto, mma.sync, wgmma).
Result gemm(const torch::Tensor& a, const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size,
            int64_t kernel) {
  using ll = long long;
  if (!a.is_cuda()) return value_error(msg("marlin: a must be a CUDA tensor, got device %s", dev(a.device()).c_str()));
  const int dtype = dtype_code(a);
  if (dtype < 0) return value_error(msg("marlin: a must be float16 or bfloat16, got %s", type_name(a)));
  if (a.dim() != 2 || !a.is_contiguous()) {
    return value_error(msg("marlin: a must be a contiguous 2-D [M, K] tensor, got %s (contiguous=%d)",
                           dims(a).c_str(), static_cast<int>(a.is_contiguous())));
  }
  int64_t k = 0, n = 0;
  const std::string err = check_weights(qweight, scales, group_size, a.device(), k, n);
  if (!err.empty()) return value_error(err);
  const int64_t m = a.size(0);
  if (a.size(1) != k) {
    return value_error(msg("marlin: a is %s but qweight %s packs K=%lld (N=%lld)", dims(a).c_str(),
                           dims(qweight).c_str(), static_cast<ll>(k), static_cast<ll>(n)));
  }
  if (scales.scalar_type() != a.scalar_type()) {
    return value_error(msg("marlin: scales dtype %s must match a's dtype %s (m=%lld, n=%lld, k=%lld)",
                           type_name(scales), type_name(a), static_cast<ll>(m), static_cast<ll>(n),
                           static_cast<ll>(k)));
  }
  if (m > INT32_MAX) return value_error(msg("marlin: M=%lld too large", static_cast<ll>(m)));
  const c10::cuda::CUDAGuard guard(a.device());
  auto c = torch::empty({m, n}, a.options());
  if (m == 0) return {c, kOk, ""};
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.get_device()) != cudaSuccess) {
    return {torch::Tensor(), kRuntimeError, msg("marlin: cannot query the multiprocessor count of %s",
                                                dev(a.device()).c_str())};
  }
  const size_t scratch_bytes =
      marlin_scratch_bytes(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), dtype, sms);
  auto scratch =
      torch::empty({static_cast<int64_t>(scratch_bytes / sizeof(float)) + 1}, a.options().dtype(torch::kFloat));
  const int status = marlin_gemm(a.data_ptr(), qweight.data_ptr<int32_t>(), scales.data_ptr(), c.data_ptr(),
                                 scratch.data_ptr<float>(),
                                 scratch_bytes, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                 static_cast<int>(k), static_cast<int>(group_size), dtype, sms,
                                 static_cast<int>(kernel), c10::cuda::getCurrentCUDAStream());
  if (status != MARLIN_OK) {
    const bool launch = status == MARLIN_ERR_LAUNCH;
    return {torch::Tensor(), launch ? kRuntimeError : kValueError,
            msg("marlin gemm (m=%lld, n=%lld, k=%lld, group_size=%lld) failed: %s%s%s", static_cast<ll>(m),
                static_cast<ll>(n), static_cast<ll>(k), static_cast<ll>(group_size), marlin_status_string(status),
                launch ? ": " : "", launch ? cudaGetErrorString(cudaGetLastError()) : "")};
  }
  return {c, kOk, ""};
}

// Dense dequantized weights [k, n] in scales' dtype.
Result dequantize(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t group_size) {
  using ll = long long;
  if (!qweight.is_cuda()) {
    return value_error(msg("marlin: qweight must be a CUDA tensor, got %s", dev(qweight.device()).c_str()));
  }
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
            msg("marlin dequantize (n=%lld, k=%lld, group_size=%lld) failed: %s", static_cast<ll>(n),
                static_cast<ll>(k), static_cast<ll>(group_size), marlin_status_string(status))};
  }
  return {out, kOk, ""};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "(C[M, N] = A[M, K] @ dequant(B), error kind, message); kernel: 0 auto, 1 mma, 2 wgmma");
  m.def("wgmma_available", &marlin_wgmma_available, "whether CUDA device `index` can run the wgmma kernel");
  m.def("dequantize", &dequantize, "(dense B [K, N], error kind, message) from Marlin-packed qweight and scales");
}
