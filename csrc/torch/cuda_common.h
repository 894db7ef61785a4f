// Helpers of the CUDA bindings: dtype mapping, the current stream, error reporting, and which
// GEMM path runs (with counters so tests and benchmarks can see which one did).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/apm_kernels.h"
#include "checks.h"

namespace apm_glue {

inline apm::DType to_apm_dtype(const at::Tensor& t, const char* fn, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return apm::DType::kFloat32;
    case at::kBFloat16: return apm::DType::kBFloat16;
    case at::kHalf: return apm::DType::kFloat16;
    default: break;
  }
  APM_CHECK_TYPE(false, fn, ": ", name, " must have dtype float32, bfloat16 or float16 on the ",
                   "CUDA backend, got ", t.scalar_type());
  return apm::DType::kFloat32;
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

inline void check_cuda_status(cudaError_t e, const char* fn, const char* what) {
  APM_CHECK(e == cudaSuccess, fn, ": ", what, " failed: ", cudaGetErrorName(e), " (",
              cudaGetErrorString(e), ")");
}

// GEMM path policy: 0 = auto (SM90 kernels where they apply, else portable), 1 = portable only,
// 2 = SM90 only (raise where it does not apply; for tests).
int gemm_policy();
void set_gemm_policy(int policy);
void count_gemm(bool sm90);

// Runs one batched GEMM on `like`'s device and current stream through the chosen path.
void run_gemm(const apm::GemmParams& p, const at::Tensor& like, const char* fn);

}  // namespace apm_glue
