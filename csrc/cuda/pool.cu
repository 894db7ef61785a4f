// Single-query attention pool (spec section 3), forward and backward, fp32 arithmetic.
//
// With kv = f + pos_out and one query per head (k~_h = W_k,h^T q_h, given as kt):
//   score[h,l] = scale kt_h . kv_l;  a = softmax_l(score);  sbar_h = sum_l a[h,l] kv_l
// Backward, c[h,l] = a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
//   df_l = sum_h a[h,l] dsbar_h + scale c[h,l] kt_h;   dkt_h = scale sum_{b,l} c[h,l] kv_l
//
// The pool moves ~1.5 MB per image: at one image it is bound by latency, not bandwidth, so every
// kernel spreads its work over as many warps as the shape allows and the passes are few
// (timings: one image of `ttt-l14` on the H200).
//   forward   scores  one block per cell: all H dot products from one read of kv_l (one warp
//                     per cell left ~8 warps per SM at one image and ran slower: 22 against 13 us)
//             wsum    one block per (image, head, 32 columns), 16 row phases: the softmax's max
//                     and sum over L (so lse needs no launch of its own), then sbar = sum_l a kv_l
//   backward  sd      one warp per (image, head): sbar . dsbar
//             rows    one block per cell: a, c (stored) and df_l (one warp per cell: 51 against 33 us)
//             dkt     one block per (student, 32 columns, row chunk): every head's partial sums
//                     from one read of kv, then a deterministic column sum over the chunks
// The per-cell and key-gradient kernels keep a register per head: they are compiled for at most
// 8 heads (every preset) and for kPoolMaxHeads (16 per-head registers of each kind took the
// per-cell kernel to 126 registers and 24 % occupancy). No atomics anywhere: the same inputs give
// the same bits.
#include <type_traits>

#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

constexpr int kWarps = 8;        // warps per block of pool_sd (one warp per image and head)
constexpr int kRowThreads = 128; // threads per block of the per-cell kernels (one cell each)
constexpr int kCols = 32;        // columns per block of the column kernels (one warp wide)
constexpr int kPhases = 16;      // row phases per block of the forward's weighted sum
constexpr int kDktPhases = 8;    // row phases per block of the key gradient

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
template <typename T, int NH>
__global__ void __launch_bounds__(kRowThreads)
    pool_scores_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                       const float* __restrict__ kt, float scale, PoolShape sh,
                       float* __restrict__ score) {
  __shared__ float red[NH * (kRowThreads / 32)];
  __shared__ float dots[NH];
  const int64_t rows = sh.S * sh.B * sh.L;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t l = row % sh.L, sb = row / sh.L, s = sb / sh.B;
    const T* frow = f + row * sh.D;
    const T* prow = pos + l * sh.D;
    const float* k = kt + s * sh.H * sh.D;
    float acc[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) acc[h] = 0.0f;
    for (int64_t d = threadIdx.x; d < sh.D; d += kRowThreads) {
      const float v = to_f32<T>(frow[d]) + to_f32<T>(prow[d]);
#pragma unroll
      for (int h = 0; h < NH; ++h)
        if (h < sh.H) acc[h] = fmaf(v, k[h * sh.D + d], acc[h]);
    }
    block_head_sums(acc, sh.H, red, dots);
    if (threadIdx.x < sh.H) score[(sb * sh.H + threadIdx.x) * sh.L + l] = dots[threadIdx.x] * scale;
  }
}

// For i = sb*H + h: lse[i] = logsumexp_l score[i, l] and sbar[i*D + d] = sum_l exp(score - lse)
// kv[sb, l, d]. Grid (S*B*H, column tiles); blocks of kCols columns x kPhases row phases. Each
// block first reduces the score row to (max, sum) in one online pass (each column tile repeats
// this small pass over L floats; the first writes lse), then thread (d, r) sums the rows
// l = r (mod kPhases) and the kPhases partial sums of a column are added in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kCols * kPhases)
    pool_wsum_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                     const float* __restrict__ score, PoolShape sh, float* __restrict__ sbar,
                     float* __restrict__ lse) {
  __shared__ float part[kPhases][kCols + 1];
  __shared__ float red_m[kCols * kPhases / 32], red_s[kCols * kPhases / 32];
  __shared__ float block_lse;
  const int tid = threadIdx.y * kCols + threadIdx.x;
  const int lane = tid % 32, warp = tid / 32, warps = kCols * kPhases / 32;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const int r = threadIdx.y;
  const int64_t n = sh.S * sh.B * sh.H;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const float* srow = score + i * sh.L;
    // (max, sum of exp) over the row: per thread online, then per warp, then per block
    float m = -INFINITY, s = 0.0f;
    for (int64_t l = tid; l < sh.L; l += kCols * kPhases) {
      const float x = srow[l];
      const float mn = fmaxf(m, x);
      s = s * expf(m - mn) + expf(x - mn);
      m = mn;
    }
    float wm = warp_max(m);
    s = warp_sum(m == -INFINITY ? 0.0f : s * expf(m - wm));
    if (lane == 0) { red_m[warp] = wm; red_s[warp] = s; }
    __syncthreads();
    if (tid == 0) {
      float bm = -INFINITY;
      for (int w = 0; w < warps; ++w) bm = fmaxf(bm, red_m[w]);
      float bs = 0.0f;
      for (int w = 0; w < warps; ++w)
        if (red_m[w] != -INFINITY) bs += red_s[w] * expf(red_m[w] - bm);
      block_lse = bm + logf(bs);
      if (blockIdx.y == 0) lse[i] = block_lse;
    }
    __syncthreads();
    const float lse_i = block_lse;
    float acc = 0.0f;
    if (d < sh.D) {
      const int64_t sb = i / sh.H;
      const T* fimg = f + sb * sh.L * sh.D;
#pragma unroll 4
      for (int64_t l = r; l < sh.L; l += kPhases) {
        const float a = expf(srow[l] - lse_i);
        acc = fmaf(a, to_f32<T>(fimg[l * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]), acc);
      }
    }
    part[r][threadIdx.x] = acc;
    __syncthreads();
    if (r == 0 && d < sh.D) {
      float t = part[0][threadIdx.x];
#pragma unroll
      for (int k = 1; k < kPhases; ++k) t += part[k][threadIdx.x];
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
template <typename T, typename TD, int NH>
__global__ void __launch_bounds__(kRowThreads)
    pool_bwd_rows_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                         const float* __restrict__ kt, float scale, PoolShape sh,
                         const float* __restrict__ lse, const float* __restrict__ dsbar,
                         const float* __restrict__ sd, TD* __restrict__ df, float* __restrict__ c) {
  __shared__ float red[NH * (kRowThreads / 32)];
  __shared__ float dk[NH], dd[NH];
  __shared__ float coef_a[NH], coef_c[NH];
  const int64_t rows = sh.S * sh.B * sh.L;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t l = row % sh.L, sb = row / sh.L, s = sb / sh.B;
    const T* frow = f + row * sh.D;
    const T* prow = pos + l * sh.D;
    const float* k = kt + s * sh.H * sh.D;
    const float* ds = dsbar + sb * sh.H * sh.D;
    float dot_k[NH], dot_d[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) dot_k[h] = dot_d[h] = 0.0f;
    for (int64_t d = threadIdx.x; d < sh.D; d += kRowThreads) {
      const float v = to_f32<T>(frow[d]) + to_f32<T>(prow[d]);
#pragma unroll
      for (int h = 0; h < NH; ++h) {
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
      for (int h = 0; h < NH; ++h) {
        if (h < sh.H) g = fmaf(coef_a[h], ds[h * sh.D + d], fmaf(coef_c[h], k[h * sh.D + d], g));
      }
      drow[d] = from_f32<TD>(g);
    }
    __syncthreads();                       // the next row reuses the shared sums
  }
}

// partial[((s*chunks + z)*H + h)*D + d] = scale sum over rows r of chunk z of c[s,b,h,l] kv[s,b,l,d]
// (r = b*L + l); grid (S, column tiles, chunks), blocks of kCols columns x kDktPhases row
// phases, every head accumulated from one read of kv; the phases are added in a fixed order.
template <typename T, int NH>
__global__ void __launch_bounds__(kCols * kDktPhases)
    pool_dkt_partial_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                            const float* __restrict__ c, float scale, PoolShape sh, int chunks,
                            float* __restrict__ partial) {
  __shared__ float part[kDktPhases][NH][kCols];
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const int phase = threadIdx.y;
  const int64_t rows = sh.B * sh.L;
  const int64_t per = (rows + chunks - 1) / chunks;
  const int64_t r0 = blockIdx.z * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  for (int64_t s = blockIdx.x; s < sh.S; s += gridDim.x) {
    float acc[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) acc[h] = 0.0f;
    if (d < sh.D) {
      for (int64_t r = r0 + phase; r < r1; r += kDktPhases) {
        const int64_t b = r / sh.L, l = r % sh.L, sb = s * sh.B + b;
        const float v = to_f32<T>(f[(sb * sh.L + l) * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]);
        const float* crow = c + sb * sh.H * sh.L + l;
#pragma unroll
        for (int h = 0; h < NH; ++h)
          if (h < sh.H) acc[h] = fmaf(crow[h * sh.L], v, acc[h]);
      }
    }
#pragma unroll
    for (int h = 0; h < NH; ++h)
      if (h < sh.H) part[phase][h][threadIdx.x] = acc[h];
    __syncthreads();
    if (d < sh.D) {
      for (int h = phase; h < sh.H; h += kDktPhases) {
        float t = part[0][h][threadIdx.x];
#pragma unroll
        for (int k = 1; k < kDktPhases; ++k) t += part[k][h][threadIdx.x];
        partial[((s * chunks + blockIdx.z) * sh.H + h) * sh.D + d] = t * scale;
      }
    }
    __syncthreads();
  }
}

unsigned grid_cap(int64_t n) { return static_cast<unsigned>(n < 65535 ? (n > 0 ? n : 1) : 65535); }

bool shape_ok(const PoolShape& sh) {
  return sh.S > 0 && sh.B > 0 && sh.L > 0 && sh.D > 0 && sh.H > 0 && sh.H <= kPoolMaxHeads;
}

// fn(std::integral_constant<int, NH>{}) with NH the per-head register count the kernels are built
// for: 8 when H <= 8 (every preset), kPoolMaxHeads otherwise.
template <typename Fn>
void with_heads(int64_t H, Fn&& fn) {
  if (H <= 8) {
    fn(std::integral_constant<int, 8>{});
  } else {
    fn(std::integral_constant<int, kPoolMaxHeads>{});
  }
}

}  // namespace

cudaError_t pool_fwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, float* score, float* sbar, float* lse, cudaStream_t stream) {
  if (!shape_ok(sh)) return cudaErrorInvalidValue;
  const int64_t rows = sh.S * sh.B * sh.L, n = sh.S * sh.B * sh.H;
  return APM_DISPATCH_DTYPE(t, T, [&] {
    with_heads(sh.H, [&](auto nh) {
      pool_scores_kernel<T, decltype(nh)::value><<<grid_cap(rows), kRowThreads, 0, stream>>>(
          static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, score);
    });
    const cudaError_t e = launch_status();
    if (e != cudaSuccess) return e;
    const dim3 grid(grid_cap(n), static_cast<unsigned>(ceil_div(sh.D, kCols)));
    pool_wsum_kernel<T><<<grid, dim3(kCols, kPhases), 0, stream>>>(
        static_cast<const T*>(f), static_cast<const T*>(pos), score, sh, sbar, lse);
    return launch_status();
  });
}

int pool_bwd_chunks(PoolShape sh, int sm_count) {
  // Chunks of at most 256 rows (each thread's loop over its rows is serial) and at least eight
  // blocks per SM (one image has only S x D / kCols = 24 column tiles), chunks of at least 64
  // rows, at most 1024 chunks.
  const int64_t rows = sh.B * sh.L;
  int64_t want = ceil_div(rows, 256);
  const int64_t base = sh.S * ceil_div(sh.D, kCols);
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
      with_heads(sh.H, [&](auto nh) {
        pool_bwd_rows_kernel<T, TD, decltype(nh)::value><<<grid_cap(rows), kRowThreads, 0, stream>>>(
            static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, lse, dsbar, sd,
            static_cast<TD*>(df), c);
      });
      return launch_status();
    });
  });
  if (e != cudaSuccess) return e;
  e = APM_DISPATCH_DTYPE(t, T, [&] {
    const dim3 grid(grid_cap(sh.S), static_cast<unsigned>(ceil_div(sh.D, kCols)),
                    static_cast<unsigned>(chunks));
    with_heads(sh.H, [&](auto nh) {
      pool_dkt_partial_kernel<T, decltype(nh)::value><<<grid, dim3(kCols, kDktPhases), 0, stream>>>(
          static_cast<const T*>(f), static_cast<const T*>(pos), c, scale, sh, chunks, partial);
    });
    return launch_status();
  });
  if (e != cudaSuccess) return e;
  // dkt[s] = sum over chunks of partial[s, chunk] (H*D columns)
  return colsum(partial, DType::kFloat32, sh.S, chunks, sh.H * sh.D, dkt, sh.H * sh.D, nullptr, 1,
                1.0f, stream);
}

}  // namespace apm
