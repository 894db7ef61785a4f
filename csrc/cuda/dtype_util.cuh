// Loads and stores of the three storage dtypes through fp32, and the launch-check helper.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "apm_kernels.h"

namespace apm {

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// The error of the launch just enqueued (cudaGetLastError also clears a non-sticky one).
inline cudaError_t launch_status() { return cudaGetLastError(); }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace apm

// Calls FN<T>(args...) with T the storage type of DType value DT (a template function name).
#define APM_DISPATCH_DTYPE(DT, T, ...)                          \
  [&]() -> cudaError_t {                                        \
    switch (DT) {                                               \
      case ::apm::DType::kFloat32: { using T = float; return __VA_ARGS__(); }          \
      case ::apm::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
      case ::apm::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }         \
    }                                                           \
    return cudaErrorInvalidValue;                               \
  }()
