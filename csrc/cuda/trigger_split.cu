// Trigger split of the first layer (spec section 3): the activation ReLU(P_l + u_b) of every
// (image, location) pair, built from the L x H position part P and one H-vector u per image.
//
// It is materialized (one bf16 write of B*L x H) before the next layer's GEMM rather than built
// on the GEMM's A-operand load: the SM90 mainloop loads A by TMA straight into shared memory, and
// adding the broadcast + ReLU there means a custom producer warp (register round trip) for a gain
// of one extra read + write of the activation (~2 x 8 MB per image). It stays a separate,
// bandwidth-bound kernel until a measurement says the fusion pays.
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

// One grid row per output row (s, b, l), threads over h; the index split happens once per row.
template <typename T>
__global__ void first_layer_act_kernel(const T* __restrict__ p, const float* __restrict__ u,
                                       T* __restrict__ a, int64_t S, int64_t B, int64_t L,
                                       int64_t H) {
  const int64_t rows = S * B * L;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t l = row % L, sb = row / L, s = sb / B;
    const T* prow = p + (s * L + l) * H;
    const float* urow = u + sb * H;
    T* arow = a + row * H;
    for (int64_t h = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; h < H;
         h += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      arow[h] = from_f32<T>(fmaxf(to_f32<T>(prow[h]) + urow[h], 0.0f));
    }
  }
}

}  // namespace

cudaError_t first_layer_act(const void* p, const float* u, void* a, DType t, int64_t S, int64_t B,
                            int64_t L, int64_t H, cudaStream_t stream) {
  if (S * B * L * H == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t gx = ceil_div(H, threads);
  const int64_t rows = S * B * L;
  const dim3 grid(static_cast<unsigned>(gx < 65535 ? gx : 65535),
                  static_cast<unsigned>(rows < 65535 ? rows : 65535));
  return APM_DISPATCH_DTYPE(t, T, [&] {
    first_layer_act_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(p), u,
                                                            static_cast<T*>(a), S, B, L, H);
    return launch_status();
  });
}

}  // namespace apm
