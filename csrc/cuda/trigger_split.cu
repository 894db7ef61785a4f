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

// The same, 16 bytes of P and of the activation per thread (8 bf16 / fp16 or 4 fp32 values):
// the scalar kernel's 2-byte accesses left it at a fifth of the copy bandwidth.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T x[kN];
};

template <typename T>
__global__ void first_layer_act_vec_kernel(const T* __restrict__ p, const float* __restrict__ u,
                                           T* __restrict__ a, int64_t S, int64_t B, int64_t L,
                                           int64_t H) {
  constexpr int kN = Pack<T>::kN;
  const int64_t rows = S * B * L, hv = H / kN;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t l = row % L, sb = row / L, s = sb / B;
    const Pack<T>* prow = reinterpret_cast<const Pack<T>*>(p + (s * L + l) * H);
    const float4* urow = reinterpret_cast<const float4*>(u + sb * H);
    Pack<T>* arow = reinterpret_cast<Pack<T>*>(a + row * H);
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < hv;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Pack<T> pv = prow[j];
      float uf[kN];
#pragma unroll
      for (int q = 0; q < kN / 4; ++q) {
        const float4 u4 = urow[j * (kN / 4) + q];
        uf[4 * q] = u4.x;
        uf[4 * q + 1] = u4.y;
        uf[4 * q + 2] = u4.z;
        uf[4 * q + 3] = u4.w;
      }
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < kN; ++k) out.x[k] = from_f32<T>(fmaxf(to_f32<T>(pv.x[k]) + uf[k], 0.0f));
      arow[j] = out;
    }
  }
}

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T x[4];
};

// From the position code's separable form (driver.position_product): P is never written; q holds
// Q (S, width + height, H) fp32, P[y * width + x] = Q[x] + Q[width + y], and a[s][b*L + l] =
// ReLU(Q[x] + Q[width + y] + u[s][b]) summed in fp32 in that order (the order of the other
// tables), rounded once. A block takes one grid row y of one image and a slice of H: Q[width + y]
// and u are read once into registers, then the row's width cells one after the other (their
// Q[x] are the same width rows for every y and image: cache hits). kVec: 4 values a thread
// (16-byte loads of q and u).
template <typename T, bool kVec>
__global__ void first_layer_act_halves_kernel(const float* __restrict__ q, const float* __restrict__ u,
                                              T* __restrict__ a, int64_t S, int64_t B, int64_t height,
                                              int64_t width, int64_t H) {
  const int64_t per = kVec ? 4 : 1, n = H / per, groups = S * B * height;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const int64_t y = g % height, sb = g / height, s = sb / B;
    const float* qs = q + s * (width + height) * H;
    const float* qy = qs + (width + y) * H;
    const float* ur = u + sb * H;
    T* arow = a + (sb * height + y) * width * H;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if constexpr (kVec) {
        const float4 y4 = reinterpret_cast<const float4*>(qy)[j];
        const float4 u4 = reinterpret_cast<const float4*>(ur)[j];
        for (int64_t x = 0; x < width; ++x) {
          const float4 x4 = reinterpret_cast<const float4*>(qs + x * H)[j];
          Pack4<T> out;
          out.x[0] = from_f32<T>(fmaxf(x4.x + y4.x + u4.x, 0.0f));
          out.x[1] = from_f32<T>(fmaxf(x4.y + y4.y + u4.y, 0.0f));
          out.x[2] = from_f32<T>(fmaxf(x4.z + y4.z + u4.z, 0.0f));
          out.x[3] = from_f32<T>(fmaxf(x4.w + y4.w + u4.w, 0.0f));
          reinterpret_cast<Pack4<T>*>(arow + x * H)[j] = out;
        }
      } else {
        const float yv = qy[j], uv = ur[j];
        for (int64_t x = 0; x < width; ++x) arow[x * H + j] = from_f32<T>(fmaxf(qs[x * H + j] + yv + uv, 0.0f));
      }
    }
  }
}

}  // namespace

cudaError_t first_layer_act(const void* p, const float* u, void* a, DType t, int64_t S, int64_t B,
                            int64_t L, int64_t H, cudaStream_t stream) {
  if (S * B * L * H == 0) return cudaSuccess;
  const int64_t rows = S * B * L;
  return APM_DISPATCH_DTYPE(t, T, [&] {
    constexpr int kN = Pack<T>::kN;
    const bool vec = H % kN == 0 && aligned(p, 16) && aligned(u, 16) && aligned(a, 16);
    const int threads = vec ? 128 : 256;
    const int64_t gx = ceil_div(vec ? H / kN : H, threads);
    const dim3 grid(static_cast<unsigned>(gx < 65535 ? gx : 65535),
                    static_cast<unsigned>(rows < 65535 ? rows : 65535));
    if (vec)
      first_layer_act_vec_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(p), u,
                                                                  static_cast<T*>(a), S, B, L, H);
    else
      first_layer_act_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(p), u,
                                                              static_cast<T*>(a), S, B, L, H);
    return launch_status();
  });
}

cudaError_t first_layer_act_halves(const float* q, const float* u, void* a, DType t, int64_t S, int64_t B,
                                   int64_t height, int64_t width, int64_t H, cudaStream_t stream) {
  const int64_t groups = S * B * height;
  if (groups * width * H == 0) return cudaSuccess;
  return APM_DISPATCH_DTYPE(t, T, [&] {
    const bool vec = H % 4 == 0 && aligned(q, 16) && aligned(u, 16) && aligned(a, 16);
    const int threads = 128;
    const int64_t gx = ceil_div(vec ? H / 4 : H, threads);
    const dim3 grid(static_cast<unsigned>(gx < 65535 ? gx : 65535),
                    static_cast<unsigned>(groups < 65535 ? groups : 65535));
    if (vec)
      first_layer_act_halves_kernel<T, true><<<grid, threads, 0, stream>>>(q, u, static_cast<T*>(a), S, B, height,
                                                                           width, H);
    else
      first_layer_act_halves_kernel<T, false><<<grid, threads, 0, stream>>>(q, u, static_cast<T*>(a), S, B, height,
                                                                            width, H);
    return launch_status();
  });
}

}  // namespace apm
