// Column sums over row groups, deterministic (no atomics): bias gradients (sum of dy over rows),
// the per-image row sums of the first layer's gradient (r = sum_l g1), and the reduction of
// split-K partial weight gradients all have this shape: out[g][c] = sum_r in[g][r][c].
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

constexpr int kLanes = 32, kRowLanes = 8, kBatch = 8;

// Block (32 column lanes) x (8 row lanes); each lane sums V adjacent columns (V = 1, or 16 bytes'
// worth when the rows allow it: a warp then reads 512 contiguous bytes of a row per load instead
// of 64), so a block covers 32 V columns. Grid (column tiles, groups, row chunks). Each chunk's
// sum goes to `partial` (G, chunks, C), or straight to `out` when there is one chunk. The
// summation order is fixed by the shape: the same bits on every call.
template <typename T, int V>
__global__ void __launch_bounds__(kLanes* kRowLanes)
    colsum_kernel(const T* __restrict__ in, int64_t G, int64_t R, int64_t C,
                  float* __restrict__ out, int64_t out_ld, float* __restrict__ partial, int chunks,
                  float scale) {
  struct alignas(sizeof(T) * V) Pack {
    T x[V];
  };
  __shared__ float red[kRowLanes][kLanes * V + 1];
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kLanes * V;
  const int64_t c = tile + static_cast<int64_t>(threadIdx.x) * V;   // this lane's first column
  const int64_t rows_per = (R + chunks - 1) / chunks;
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  for (int64_t g = blockIdx.y; g < G; g += gridDim.y) {
    const int64_t r0 = blockIdx.z * rows_per;
    const int64_t r1 = r0 + rows_per < R ? r0 + rows_per : R;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    if (c < C) {   // V > 1 only when C is a multiple of V: a lane's columns are all in range
      const T* col = in + g * R * C + c;
      // kBatch rows' loads in flight together (a plain loop waits for each before the next);
      // the additions stay in row order
      for (int64_t rb = r0 + threadIdx.y; rb < r1; rb += kBatch * kRowLanes) {
        Pack v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int64_t r = rb + u * kRowLanes;
          if (r < r1) v[u] = *reinterpret_cast<const Pack*>(col + r * C);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (rb + u * kRowLanes < r1) {
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] += to_f32<T>(v[u].x[i]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) red[threadIdx.y][threadIdx.x * V + i] = acc[i];
    __syncthreads();
    // the row lanes summed in order, one column per thread
    for (int k = tid; k < kLanes * V; k += kLanes * kRowLanes) {
      const int64_t cc = tile + k;
      if (cc < C) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < kRowLanes; ++i) s += red[i][k];
        if (chunks == 1) {
          out[g * out_ld + cc] = s * scale;
        } else {
          partial[(g * chunks + blockIdx.z) * C + cc] = s;
        }
      }
    }
    __syncthreads();
  }
}

template <typename T, int V>
cudaError_t launch_v(const T* in, int64_t G, int64_t R, int64_t C, float* out, int64_t out_ld,
                     float* partial, int chunks, float scale, cudaStream_t stream) {
  const dim3 block(kLanes, kRowLanes);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kLanes * V)),
                  static_cast<unsigned>(G < 65535 ? G : 65535), static_cast<unsigned>(chunks));
  colsum_kernel<T, V><<<grid, block, 0, stream>>>(in, G, R, C, out, out_ld, partial, chunks, scale);
  return launch_status();
}

// 16-byte loads when every row starts 16-byte aligned, else one element per lane.
template <typename T>
cudaError_t launch(const T* in, int64_t G, int64_t R, int64_t C, float* out, int64_t out_ld,
                   float* partial, int chunks, float scale, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (reinterpret_cast<uintptr_t>(in) % 16 == 0 && C % V == 0) {
    return launch_v<T, V>(in, G, R, C, out, out_ld, partial, chunks, scale, stream);
  }
  return launch_v<T, 1>(in, G, R, C, out, out_ld, partial, chunks, scale, stream);
}

}  // namespace

int colsum_chunks(int64_t groups, int64_t rows, int64_t cols, int sm_count) {
  // Enough blocks for two waves of the GPU (counted with the 16-bit loads' 256 columns per
  // block) and chunks of at most 1024 rows, each chunk at least 64 rows, at most 1024 chunks.
  const int64_t base = ceil_div(cols, kLanes * 8) * groups;
  int64_t want = ceil_div(2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 132), base);
  if (want < ceil_div(rows, 1024)) want = ceil_div(rows, 1024);
  const int64_t most = ceil_div(rows, 64);
  if (want > most) want = most;
  if (want > 1024) want = 1024;
  return static_cast<int>(want < 1 ? 1 : want);
}

cudaError_t colsum(const void* in, DType in_t, int64_t groups, int64_t rows, int64_t cols,
                   float* out, int64_t out_ld, float* partial, int chunks, float scale,
                   cudaStream_t stream) {
  if (groups <= 0 || cols <= 0) return cudaSuccess;
  if (chunks < 1 || chunks > 65535 || (chunks > 1 && partial == nullptr)) return cudaErrorInvalidValue;
  if (rows <= 0) chunks = 1;
  cudaError_t e = APM_DISPATCH_DTYPE(in_t, T, [&] {
    return launch<T>(static_cast<const T*>(in), groups, rows, cols, out, out_ld, partial, chunks,
                     scale, stream);
  });
  if (e != cudaSuccess || chunks == 1) return e;
  return launch<float>(partial, groups, chunks, cols, out, out_ld, nullptr, 1, scale, stream);
}

}  // namespace apm
