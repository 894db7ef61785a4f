// Single-query attention pool (spec section 3), forward and backward, fp32 arithmetic.
//
// With kv = f + pos_out and one query per head (k~_h = W_k,h^T q_h, given as kt):
//   score[h,l] = scale kt_h . kv_l;  a = softmax_l(score);  sbar_h = sum_l a[h,l] kv_l
// Backward, c[h,l] = a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
//   df_l = sum_h a[h,l] dsbar_h + scale c[h,l] kt_h;   dkt_h = scale sum_{b,l} c[h,l] kv_l
//
// Kernels (each a simple pass; the pool moves ~1.5 MB per image, far from the GEMMs' cost):
//   scores   one block per cell l: all H dot products from one read of kv_l
//   lse      one block per (image, head): log-sum-exp over L
//   wsum     one block per (image, head, 128 columns), 8 row phases: sbar = sum_l a kv_l,
//            coalesced over d
//   rows     (backward) one block per cell: a, c and df_l
//   dkt      (backward) partial sums over row chunks, then a deterministic column sum
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

constexpr int kWarps = 8;  // warps per block of pool_sd (one warp per image and head)
constexpr int kCols = 128; // columns per block of the column kernels
constexpr int kSplit = 8;  // row phases per block of the forward's weighted sum
constexpr int kRowThreads = 128;  // threads per block of the per-cell kernels (one cell each)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums over d of each thread's per-head partials, over the whole block: out[h] (shared memory,
// h < kPoolMaxHeads) = sum over the block's threads of part[h], in a fixed order (deterministic).
// Every thread must call it; `red` holds kPoolMaxHeads x (warps) floats.
template <int kHeads>
__device__ __forceinline__ void block_head_sums(float (&part)[kHeads], int H, float* red, float* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (h < H) {
      const float t = warp_sum(part[h]);
      if (lane == 0) red[h * warps + warp] = t;
    }
  }
  __syncthreads();
  if (threadIdx.x < H) {
    float t = 0.0f;
    for (int w = 0; w < warps; ++w) t += red[threadIdx.x * warps + w];
    out[threadIdx.x] = t;
  }
  __syncthreads();
}

// score[(sb*H + h)*L + l] for every cell row = sb*L + l: one block of kRowThreads per row, the
// threads over d (one warp per row left ~8 warps per SM at one image: latency bound).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    pool_scores_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                       const float* __restrict__ kt, float scale, PoolShape sh,
                       float* __restrict__ score) {
  __shared__ float red[kPoolMaxHeads * (kRowThreads / 32)];
  __shared__ float dots[kPoolMaxHeads];
  const int64_t rows = sh.S * sh.B * sh.L;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t l = row % sh.L, sb = row / sh.L, s = sb / sh.B;
    const T* frow = f + row * sh.D;
    const T* prow = pos + l * sh.D;
    const float* k = kt + s * sh.H * sh.D;
    float acc[kPoolMaxHeads];
#pragma unroll
    for (int h = 0; h < kPoolMaxHeads; ++h) acc[h] = 0.0f;
    for (int64_t d = threadIdx.x; d < sh.D; d += kRowThreads) {
      const float v = to_f32<T>(frow[d]) + to_f32<T>(prow[d]);
#pragma unroll
      for (int h = 0; h < kPoolMaxHeads; ++h)
        if (h < sh.H) acc[h] = fmaf(v, k[h * sh.D + d], acc[h]);
    }
    block_head_sums(acc, sh.H, red, dots);
    if (threadIdx.x < sh.H) score[(sb * sh.H + threadIdx.x) * sh.L + l] = dots[threadIdx.x] * scale;
  }
}

// lse[i] = logsumexp(score[i, :L]) for i = sb*H + h; one block of 256 threads per i.
__global__ void __launch_bounds__(256)
    pool_lse_kernel(const float* __restrict__ score, int64_t n, int64_t L, float* __restrict__ lse) {
  __shared__ float red[8];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const float* row = score + i * L;
    float m = -INFINITY;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) m = fmaxf(m, row[l]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) m = fmaxf(m, red[w]);
    __syncthreads();
    float s = 0.0f;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) s += expf(row[l] - m);
    s = warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < 8; ++w) t += red[w];
      lse[i] = m + logf(t);
    }
    __syncthreads();
  }
}

// sbar[(sb*H + h)*D + d] = sum_l exp(score - lse) kv[sb, l, d]; grid (S*B*H, column tiles),
// blocks of kCols columns x kSplit row phases: thread (d, r) sums the rows l = r (mod kSplit),
// then the kSplit partial sums of a column are added in a fixed order (deterministic). One
// thread per column walking all L rows left ~70 blocks of serial loops at one image (latency
// bound: 20 % of the cuda table's step); kSplit phases make the chains kSplit times shorter.
template <typename T>
__global__ void __launch_bounds__(kCols * kSplit)
    pool_wsum_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                     const float* __restrict__ score, const float* __restrict__ lse, PoolShape sh,
                     float* __restrict__ sbar) {
  __shared__ float part[kSplit][kCols];
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const int r = threadIdx.y;
  const int64_t n = sh.S * sh.B * sh.H;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    float acc = 0.0f;
    if (d < sh.D) {
      const int64_t sb = i / sh.H;
      const float* srow = score + i * sh.L;
      const float m = lse[i];
      const T* fimg = f + sb * sh.L * sh.D;
      for (int64_t l = r; l < sh.L; l += kSplit) {
        const float a = expf(srow[l] - m);
        acc = fmaf(a, to_f32<T>(fimg[l * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]), acc);
      }
    }
    part[r][threadIdx.x] = acc;
    __syncthreads();
    if (r == 0 && d < sh.D) {
      float t = part[0][threadIdx.x];
#pragma unroll
      for (int k = 1; k < kSplit; ++k) t += part[k][threadIdx.x];
      sbar[i * sh.D + d] = t;
    }
    __syncthreads();
  }
}

// sd[i] = sbar[i] . dsbar[i] over D, i = sb*H + h; one warp per i.
__global__ void __launch_bounds__(kWarps * 32)
    pool_sd_kernel(const float* __restrict__ sbar, const float* __restrict__ dsbar, int64_t n,
                   int64_t D, float* __restrict__ sd) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; i < n;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    float acc = 0.0f;
    for (int64_t d = lane; d < D; d += 32) acc = fmaf(sbar[i * D + d], dsbar[i * D + d], acc);
    acc = warp_sum(acc);
    if (lane == 0) sd[i] = acc;
  }
}

// Per cell (one block of kRowThreads per row sb*L + l, threads over d): a[h], c[h] (stored), df_l.
template <typename T, typename TD>
__global__ void __launch_bounds__(kRowThreads)
    pool_bwd_rows_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                         const float* __restrict__ kt, float scale, PoolShape sh,
                         const float* __restrict__ lse, const float* __restrict__ dsbar,
                         const float* __restrict__ sd, TD* __restrict__ df, float* __restrict__ c) {
  __shared__ float red[kPoolMaxHeads * (kRowThreads / 32)];
  __shared__ float dk[kPoolMaxHeads], dd[kPoolMaxHeads];
  __shared__ float coef_a[kPoolMaxHeads], coef_c[kPoolMaxHeads];
  const int64_t rows = sh.S * sh.B * sh.L;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t l = row % sh.L, sb = row / sh.L, s = sb / sh.B;
    const T* frow = f + row * sh.D;
    const T* prow = pos + l * sh.D;
    const float* k = kt + s * sh.H * sh.D;
    const float* ds = dsbar + sb * sh.H * sh.D;
    float dot_k[kPoolMaxHeads], dot_d[kPoolMaxHeads];
#pragma unroll
    for (int h = 0; h < kPoolMaxHeads; ++h) dot_k[h] = dot_d[h] = 0.0f;
    for (int64_t d = threadIdx.x; d < sh.D; d += kRowThreads) {
      const float v = to_f32<T>(frow[d]) + to_f32<T>(prow[d]);
#pragma unroll
      for (int h = 0; h < kPoolMaxHeads; ++h) {
        if (h < sh.H) {
          dot_k[h] = fmaf(v, k[h * sh.D + d], dot_k[h]);
          dot_d[h] = fmaf(v, ds[h * sh.D + d], dot_d[h]);
        }
      }
    }
    block_head_sums(dot_k, sh.H, red, dk);
    block_head_sums(dot_d, sh.H, red, dd);
    if (threadIdx.x < sh.H) {
      const int h = threadIdx.x;
      const int64_t i = sb * sh.H + h;
      const float a = expf(dk[h] * scale - lse[i]);
      const float ch = a * (dd[h] - sd[i]);
      c[i * sh.L + l] = ch;
      coef_a[h] = a;
      coef_c[h] = ch * scale;
    }
    __syncthreads();
    TD* drow = df + row * sh.D;
    for (int64_t d = threadIdx.x; d < sh.D; d += kRowThreads) {
      float g = 0.0f;
#pragma unroll
      for (int h = 0; h < kPoolMaxHeads; ++h) {
        if (h < sh.H) g = fmaf(coef_a[h], ds[h * sh.D + d], fmaf(coef_c[h], k[h * sh.D + d], g));
      }
      drow[d] = from_f32<TD>(g);
    }
    __syncthreads();                       // the next row reuses the shared sums
  }
}

// partial[((s*chunks + z)*H + h)*D + d] = scale sum over rows r of chunk z of c[s,b,h,l] kv[s,b,l,d]
// (r = b*L + l); grid (S*H, column tiles, chunks).
template <typename T>
__global__ void __launch_bounds__(kCols)
    pool_dkt_partial_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                            const float* __restrict__ c, float scale, PoolShape sh, int chunks,
                            float* __restrict__ partial) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  if (d >= sh.D) return;
  const int64_t rows = sh.B * sh.L;
  const int64_t per = (rows + chunks - 1) / chunks;
  const int64_t r0 = blockIdx.z * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  for (int64_t i = blockIdx.x; i < sh.S * sh.H; i += gridDim.x) {
    const int64_t s = i / sh.H, h = i % sh.H;
    float acc = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / sh.L, l = r % sh.L, sb = s * sh.B + b;
      const float cv = c[(sb * sh.H + h) * sh.L + l];
      const float v = to_f32<T>(f[(sb * sh.L + l) * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]);
      acc = fmaf(cv, v, acc);
    }
    partial[((s * chunks + blockIdx.z) * sh.H + h) * sh.D + d] = acc * scale;
  }
}

unsigned grid_cap(int64_t n) { return static_cast<unsigned>(n < 65535 ? (n > 0 ? n : 1) : 65535); }

bool shape_ok(const PoolShape& sh) {
  return sh.S > 0 && sh.B > 0 && sh.L > 0 && sh.D > 0 && sh.H > 0 && sh.H <= kPoolMaxHeads;
}

}  // namespace

cudaError_t pool_fwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, float* score, float* sbar, float* lse, cudaStream_t stream) {
  if (!shape_ok(sh)) return cudaErrorInvalidValue;
  const int64_t rows = sh.S * sh.B * sh.L, n = sh.S * sh.B * sh.H;
  return APM_DISPATCH_DTYPE(t, T, [&] {
    pool_scores_kernel<T><<<grid_cap(rows), kRowThreads, 0, stream>>>(
        static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, score);
    cudaError_t e = launch_status();
    if (e != cudaSuccess) return e;
    pool_lse_kernel<<<grid_cap(n), 256, 0, stream>>>(score, n, sh.L, lse);
    if ((e = launch_status()) != cudaSuccess) return e;
    const dim3 grid(grid_cap(n), static_cast<unsigned>(ceil_div(sh.D, kCols)));
    pool_wsum_kernel<T><<<grid, dim3(kCols, kSplit), 0, stream>>>(static_cast<const T*>(f),
                                                    static_cast<const T*>(pos), score, lse, sh, sbar);
    return launch_status();
  });
}

int pool_bwd_chunks(PoolShape sh, int sm_count) {
  // Chunks of at most 256 rows (each block's loop over its rows is serial) and at least eight
  // blocks per SM (two left one image's 12 x 6 x 4 blocks walking 256 rows each: latency bound),
  // chunks of at least 64 rows, at most 1024 chunks.
  const int64_t rows = sh.B * sh.L;
  int64_t want = ceil_div(rows, 256);
  const int64_t base = sh.S * sh.H * ceil_div(sh.D, kCols);
  const int64_t waves = ceil_div(8 * static_cast<int64_t>(sm_count > 0 ? sm_count : 132), base);
  if (want < waves) want = waves;
  const int64_t most = ceil_div(rows, 64);
  if (want > most) want = most;
  if (want > 1024) want = 1024;
  return static_cast<int>(want < 1 ? 1 : want);
}

cudaError_t pool_bwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, const float* sbar, const float* lse, const float* dsbar,
                     void* df, DType df_t, float* dkt, float* sd, float* c, float* partial,
                     int chunks, cudaStream_t stream) {
  if (!shape_ok(sh) || chunks < 1 || chunks > 65535) return cudaErrorInvalidValue;
  const int64_t rows = sh.S * sh.B * sh.L, n = sh.S * sh.B * sh.H;
  pool_sd_kernel<<<grid_cap(ceil_div(n, kWarps)), kWarps * 32, 0, stream>>>(sbar, dsbar, n, sh.D, sd);
  cudaError_t e = launch_status();
  if (e != cudaSuccess) return e;
  e = APM_DISPATCH_DTYPE(t, T, [&] {
    return APM_DISPATCH_DTYPE(df_t, TD, [&] {
      pool_bwd_rows_kernel<T, TD><<<grid_cap(rows), kRowThreads, 0, stream>>>(
          static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, lse, dsbar, sd,
          static_cast<TD*>(df), c);
      return launch_status();
    });
  });
  if (e != cudaSuccess) return e;
  e = APM_DISPATCH_DTYPE(t, T, [&] {
    const dim3 grid(grid_cap(sh.S * sh.H), static_cast<unsigned>(ceil_div(sh.D, kCols)),
                    static_cast<unsigned>(chunks));
    pool_dkt_partial_kernel<T><<<grid, kCols, 0, stream>>>(
        static_cast<const T*>(f), static_cast<const T*>(pos), c, scale, sh, chunks, partial);
    return launch_status();
  });
  if (e != cudaSuccess) return e;
  // dkt[s] = sum over chunks of partial[s, chunk] (H*D columns)
  return colsum(partial, DType::kFloat32, sh.S, chunks, sh.H * sh.D, dkt, sh.H * sh.D, nullptr, 1,
                1.0f, stream);
}

}  // namespace apm
