// Portable batched GEMM with the same fused epilogue as the SM90 kernels (bias, ReLU, ReLU mask).
//
// It runs whatever the SM90 kernels do not take: fp32 and fp16 problems, sizes or strides that
// break TMA's 16-byte rules, GPUs other than sm_90, and builds without CUTLASS. It is a plain
// shared-memory tiled kernel on CUDA cores (64 x 64 tile, 16-deep k slices, 4 x 4 outputs per
// thread, fp32 accumulation): simple enough to be right for any strides, not meant to be fast.
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// Loads the kBK-deep slice [k0, k0 + kBK) of rows [r0, r0 + 64) of X (rows x k, strides s_r, s_k)
// into tile[kk][r] as fp32, zero outside. Consecutive threads walk the unit-stride dimension.
template <typename T>
__device__ __forceinline__ void load_tile(float (*tile)[kBM + 4], const T* x, int64_t rows,
                                          int64_t k, int64_t s_r, int64_t s_k, int64_t r0,
                                          int64_t k0) {
  const bool k_inner = s_k == 1;
#pragma unroll
  for (int i = 0; i < (kBM * kBK) / kThreads; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int r = k_inner ? e / kBK : e % kBM;
    const int kk = k_inner ? e % kBK : e / kBM;
    const int64_t gr = r0 + r, gk = k0 + kk;
    tile[kk][r] = (gr < rows && gk < k) ? to_f32<T>(x[gr * s_r + gk * s_k]) : 0.0f;
  }
}

template <typename TI, typename TO>
__global__ void __launch_bounds__(kThreads) gemm_portable_kernel(GemmParams p) {
  __shared__ float as[kBK][kBM + 4];
  __shared__ float bs[kBK][kBN + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  for (int64_t bt = blockIdx.z; bt < p.batch; bt += gridDim.z) {
    const TI* a = static_cast<const TI*>(p.a) + bt * p.a_sb;
    const TI* b = static_cast<const TI*>(p.b) + bt * p.b_sb;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < p.k; k0 += kBK) {
      load_tile<TI>(as, a, p.m, p.k, p.a_sm, p.a_sk, m0, k0);
      load_tile<TI>(bs, b, p.n, p.k, p.b_sn, p.b_sk, n0, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
    const TI* bias = p.bias ? static_cast<const TI*>(p.bias) + bt * p.bias_sb : nullptr;
    const TI* mask = p.mask ? static_cast<const TI*>(p.mask) + bt * p.mask_sb : nullptr;
    TO* d = static_cast<TO*>(p.d) + bt * p.d_sb;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = m0 + ty + 16 * i;
      if (r >= p.m) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = n0 + tx + 16 * j;
        if (c >= p.n) continue;
        float v = acc[i][j];
        if (bias) v += to_f32<TI>(bias[c]);
        if (p.relu) v = fmaxf(v, 0.0f);
        if (mask && !(to_f32<TI>(mask[r * p.mask_sm + c * p.mask_sn]) > 0.0f)) v = 0.0f;
        d[r * p.d_sm + c * p.d_sn] = from_f32<TO>(v);
      }
    }
  }
}

template <typename TI, typename TO>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  const int64_t gx = ceil_div(p.n, kBN), gy = ceil_div(p.m, kBM);
  if (gy > 65535) return cudaErrorInvalidConfiguration;  // m > 4M rows: not an APM shape
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  gemm_portable_kernel<TI, TO><<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

template <typename TI>
cudaError_t launch_out(const GemmParams& p, cudaStream_t stream) {
  switch (p.out) {
    case DType::kFloat32: return launch<TI, float>(p, stream);
    case DType::kBFloat16: return launch<TI, __nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch<TI, __half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gemm_portable(const GemmParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.m <= 0 || p.n <= 0) return cudaSuccess;  // nothing to write
  if (p.k <= 0) return cudaErrorInvalidValue;  // the caller fills empty contractions itself
  switch (p.in) {
    case DType::kFloat32: return launch_out<float>(p, stream);
    case DType::kBFloat16: return launch_out<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_out<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace apm
