// Column sums over row groups, deterministic (no atomics): bias gradients (sum of dy over rows),
// the per-image row sums of the first layer's gradient (r = sum_l g1), and the reduction of
// split-K partial weight gradients all have this shape: out[g][c] = sum_r in[g][r][c].
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

constexpr int kCols = 32, kRowLanes = 8;

// Block (32 columns) x (8 row lanes); grid (column tiles, groups, row chunks). Each chunk's sum
// goes to `partial` (G, chunks, C), or straight to `out` when there is one chunk.
template <typename T>
__global__ void __launch_bounds__(kCols* kRowLanes)
    colsum_kernel(const T* __restrict__ in, int64_t G, int64_t R, int64_t C,
                  float* __restrict__ out, int64_t out_ld, float* __restrict__ partial, int chunks,
                  float scale) {
  __shared__ float red[kRowLanes][kCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t rows_per = (R + chunks - 1) / chunks;
  for (int64_t g = blockIdx.y; g < G; g += gridDim.y) {
    const int64_t r0 = blockIdx.z * rows_per;
    const int64_t r1 = r0 + rows_per < R ? r0 + rows_per : R;
    float acc = 0.0f;
    if (c < C) {
      const T* col = in + g * R * C + c;
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) acc += to_f32<T>(col[r * C]);
    }
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kRowLanes; ++i) s += red[i][threadIdx.x];
      if (chunks == 1) {
        out[g * out_ld + c] = s * scale;
      } else {
        partial[(g * chunks + blockIdx.z) * C + c] = s;
      }
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch(const T* in, int64_t G, int64_t R, int64_t C, float* out, int64_t out_ld,
                   float* partial, int chunks, float scale, cudaStream_t stream) {
  const dim3 block(kCols, kRowLanes);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kCols)),
                  static_cast<unsigned>(G < 65535 ? G : 65535), static_cast<unsigned>(chunks));
  colsum_kernel<T><<<grid, block, 0, stream>>>(in, G, R, C, out, out_ld, partial, chunks, scale);
  return launch_status();
}

}  // namespace

int colsum_chunks(int64_t groups, int64_t rows, int64_t cols, int sm_count) {
  // Enough blocks for two waves of the GPU and chunks of at most 1024 rows (a thread then sums
  // <= 128 values), each chunk at least 64 rows, at most 1024 chunks.
  const int64_t base = ceil_div(cols, kCols) * groups;
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
