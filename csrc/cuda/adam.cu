// Adam (no weight decay) over the flat fp32 parameter buffer: one launch updates every tensor of
// every student (the buffer is what apex's multi-tensor apply builds from a tensor list; here the
// trainer keeps the parameters as views of one buffer, so one flat pass does it).
//
// Capturable: the update number and the learning rate are read from device memory at run time,
// so a CUDA graph that captured this launch stays right as the caller increments `step`.
// Bias corrections follow torch.optim.Adam: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
//
// Memory bound (30 B per parameter with fp32 moments, 22 B with bf16 ones): four elements per
// thread and iteration through 16-byte loads and stores (8-byte for the 16-bit moments and copy)
// where every buffer is aligned for them, element by element otherwise. The moments are fp32 or
// bf16: read into fp32, updated there, rounded once when stored.
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T x[4];
};

struct AdamCoef {
  float b1, b2, omb1, omb2, eps, step_size, bc2_sqrt;
};

__device__ __forceinline__ void adam_one(const AdamCoef& c, float g, float& p, float& m, float& v) {
  m = fmaf(c.b1, m, c.omb1 * g);
  v = fmaf(c.b2, v, c.omb2 * g * g);
  p = p - c.step_size * m / (sqrtf(v) / c.bc2_sqrt + c.eps);
}

template <typename TM, typename TL>
__global__ void __launch_bounds__(256)
    adam_kernel(float* __restrict__ p, const float* __restrict__ g, TM* __restrict__ m,
                TM* __restrict__ v, TL* __restrict__ lowp, int64_t n,
                const float* __restrict__ step, const float* __restrict__ lr, double beta1,
                double beta2, float omb1, float omb2, float eps, bool vec) {
  // The bias corrections in double, once per thread (as torch computes them on the host).
  const double t = static_cast<double>(*step);
  const double bc1 = 1.0 - pow(beta1, t);
  const double bc2 = 1.0 - pow(beta2, t);
  const AdamCoef c{static_cast<float>(beta1), static_cast<float>(beta2), omb1, omb2, eps,
                   static_cast<float>(static_cast<double>(*lr) / bc1), static_cast<float>(sqrt(bc2))};
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = n / 4;
    for (int64_t j = first; j < n4; j += stride) {
      const float4 gv = reinterpret_cast<const float4*>(g)[j];
      float4 pv = reinterpret_cast<float4*>(p)[j];
      Vec4<TM> mv = reinterpret_cast<Vec4<TM>*>(m)[j];
      Vec4<TM> vv = reinterpret_cast<Vec4<TM>*>(v)[j];
      float pf[4] = {pv.x, pv.y, pv.z, pv.w};
      const float gf[4] = {gv.x, gv.y, gv.z, gv.w};
      Vec4<TL> lv;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float mk = to_f32<TM>(mv.x[k]), vk = to_f32<TM>(vv.x[k]);
        adam_one(c, gf[k], pf[k], mk, vk);
        mv.x[k] = from_f32<TM>(mk);
        vv.x[k] = from_f32<TM>(vk);
        lv.x[k] = from_f32<TL>(pf[k]);
      }
      reinterpret_cast<float4*>(p)[j] = make_float4(pf[0], pf[1], pf[2], pf[3]);
      reinterpret_cast<Vec4<TM>*>(m)[j] = mv;
      reinterpret_cast<Vec4<TM>*>(v)[j] = vv;
      if (lowp != nullptr) reinterpret_cast<Vec4<TL>*>(lowp)[j] = lv;
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    float pi = p[i], mi = to_f32<TM>(m[i]), vi = to_f32<TM>(v[i]);
    adam_one(c, g[i], pi, mi, vi);
    m[i] = from_f32<TM>(mi);
    v[i] = from_f32<TM>(vi);
    p[i] = pi;
    if (lowp != nullptr) lowp[i] = from_f32<TL>(pi);
  }
}

bool aligned(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

size_t dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace

cudaError_t adam(float* params, const float* grads, void* exp_avg, void* exp_avg_sq, DType moment_t,
                 int64_t n, const float* step, const float* lr, double beta1, double beta2, double eps,
                 void* lowp, DType lowp_t, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (moment_t == DType::kFloat16) return cudaErrorInvalidValue;   // fp32 or bf16 moments
  const bool vec = aligned(params, 16) && aligned(grads, 16) &&
                   aligned(exp_avg, 4 * dtype_bytes(moment_t)) && aligned(exp_avg_sq, 4 * dtype_bytes(moment_t)) &&
                   aligned(lowp, 4 * dtype_bytes(lowp_t));
  const int threads = 256;
  // a few waves of blocks, each thread striding over the rest (memory bound)
  const int64_t work = vec ? ceil_div(n, 4) : n;
  const int64_t blocks = ceil_div(work, threads) < 4096 ? ceil_div(work, threads) : 4096;
  return APM_DISPATCH_DTYPE(moment_t, TM, [&] {
    return APM_DISPATCH_DTYPE(lowp_t, TL, [&] {
      adam_kernel<TM, TL><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          params, grads, static_cast<TM*>(exp_avg), static_cast<TM*>(exp_avg_sq), static_cast<TL*>(lowp), n,
          step, lr, beta1, beta2,
          // 1 - beta in double, then rounded (as torch does): 1.0f - 0.999f is off by 1e-5 relative
          static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2), static_cast<float>(eps), vec);
      return launch_status();
    });
  });
}

}  // namespace apm
