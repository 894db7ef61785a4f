// Adam (no weight decay) over the flat fp32 parameter buffer: one launch updates every tensor of
// every student (the buffer is what apex's multi-tensor apply builds from a tensor list; here the
// trainer keeps the parameters as views of one buffer, so one flat pass does it).
//
// Capturable: the update number and the learning rate are read from device memory at run time,
// so a CUDA graph that captured this launch stays right as the caller increments `step`.
// Bias corrections follow torch.optim.Adam: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

template <typename TL>
__global__ void __launch_bounds__(256)
    adam_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                float* __restrict__ v, TL* __restrict__ lowp, int64_t n,
                const float* __restrict__ step, const float* __restrict__ lr, double beta1,
                double beta2, float omb1, float omb2, float eps) {
  // The bias corrections in double, once per thread (as torch computes them on the host).
  const double t = static_cast<double>(*step);
  const double bc1 = 1.0 - pow(beta1, t);
  const double bc2 = 1.0 - pow(beta2, t);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float step_size = static_cast<float>(static_cast<double>(*lr) / bc1);
  const float bc2_sqrt = static_cast<float>(sqrt(bc2));
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = fmaf(b1, m[i], omb1 * gi);
    const float vi = fmaf(b2, v[i], omb2 * gi * gi);
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    p[i] = pi;
    if (lowp != nullptr) lowp[i] = from_f32<TL>(pi);
  }
}

}  // namespace

cudaError_t adam(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, int64_t n,
                 const float* step, const float* lr, double beta1, double beta2, double eps,
                 void* lowp, DType lowp_t, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 256;
  // a few waves of blocks, each thread striding over the rest (memory bound)
  const int64_t blocks = ceil_div(n, threads) < 4096 ? ceil_div(n, threads) : 4096;
  return APM_DISPATCH_DTYPE(lowp_t, TL, [&] {
    adam_kernel<TL><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        params, grads, exp_avg, exp_avg_sq, static_cast<TL*>(lowp), n, step, lr, beta1, beta2,
        // 1 - beta in double, then rounded (as torch does): 1.0f - 0.999f is off by 1e-5 relative
        static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2), static_cast<float>(eps));
    return launch_status();
  });
}

}  // namespace apm
