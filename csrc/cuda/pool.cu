// Single-query attention pool (spec section 3), forward and backward, fp32 arithmetic.
//
// With kv = f + pos_out and one query per head (k~_h = W_k,h^T q_h, given as kt):
//   score[h,l] = scale kt_h . kv_l;  a = softmax_l(score);  sbar_h = sum_l a[h,l] kv_l
// Backward, c[h,l] = a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
//   df_l = sum_h a[h,l] dsbar_h + scale c[h,l] kt_h;   dkt_h = scale sum_{b,l} c[h,l] kv_l
//
// The pool moves ~1.5 MB per image: at one image it is bound by latency, not bandwidth. Both
// directions run one block per *tile* of rows of one image (pool_tile_rows: 8 rows at one image,
// 128 blocks; up to 64 rows when there are images enough to fill the GPU), in two launches:
//   forward   tile     kt staged in shared memory; one warp per row: every head's score from one
//                      read of kv_l; then, per head, the tile's max, sum of exp and exp-weighted
//                      sum of kv over its rows (a partial softmax, written per tile)
//             combine  per (image, head, 32 columns): the tiles' partials merged exactly
//                      (rescaled to the overall max), giving lse and sbar
//   backward  tile     kt and dsbar staged in shared memory, sbar . dsbar per head; one warp per
//                      row: a, c and df_l; then the tile's partial key gradient sum_l c kv_l
//             colsum   the tiles' partial key gradients summed per student (colsum.cu)
// Staging reads kt (and dsbar) once per block instead of once per row from L2. On the H200 at
// `ttt-l14`'s shape (benchmarks/results/h200/suite/primitives.json), against the per-row kernels
// this replaced: one image, forward 18.8 us (19.4), backward 31.5 us (41.4; the Triton table's:
// 13.0 and 18.5, so one image is still bound by the chain of dependent loads of 8 warps per SM);
// 64 images, forward 0.32 ms (0.72), backward 0.73 ms (1.97). Each thread keeps a register per
// head: the kernels are compiled for at most 8 heads (every preset) and for kPoolMaxHeads. No
// atomics anywhere: the same inputs give the same bits.
#include <type_traits>

#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

constexpr int kTileWarps = 8;                    // warps per block of the tile kernels
constexpr int kTileThreads = kTileWarps * 32;
constexpr int kMaxTileRows = 64;                 // rows per tile: a multiple of kTileWarps
constexpr int kCols = 32;                        // columns per block of the combine kernel
constexpr int kPhases = 8;                       // tile phases per block of the combine kernel
constexpr int kMaxStagedBytes = 160 * 1024;      // larger kt (and dsbar) are read from L2

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's copy of n floats from src (when staged), else src itself.
__device__ __forceinline__ const float* stage(const float* __restrict__ src, int64_t n, bool staged,
                                              float* dst) {
  if (!staged) return src;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  return dst;
}

// out[h * D + d] = sum over the tile's rows r of weight[r][h] kv[l0 + r, d], every head h < H: the
// forward's exp-weighted sums and the backward's key-gradient partials (threads over d).
template <typename T, int NH>
__device__ __forceinline__ void tile_weighted_sums(const T* __restrict__ fimg, const T* __restrict__ pos,
                                                   const PoolShape& sh, int64_t l0, int rows,
                                                   const float (*weight)[NH], float* __restrict__ out) {
  for (int64_t d = threadIdx.x; d < sh.D; d += kTileThreads) {
    float acc[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) acc[h] = 0.0f;
    for (int r = 0; r < rows; ++r) {
      const int64_t l = l0 + r;
      const float v = to_f32<T>(fimg[l * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]);
#pragma unroll
      for (int h = 0; h < NH; ++h)
        if (h < sh.H) acc[h] = fmaf(weight[r][h], v, acc[h]);
    }
#pragma unroll
    for (int h = 0; h < NH; ++h)
      if (h < sh.H) out[h * sh.D + d] = acc[h];
  }
}

// Forward, one block per (image sb, tile of rows): per head h, over the tile's rows,
// m = max score, s = sum exp(score - m), acc[d] = sum exp(score - m) kv[d]; written to
// part_m / part_s ((S*B, tiles, H)) and part_acc ((S*B, tiles, H, D)).
template <typename T, int NH>
__global__ void __launch_bounds__(kTileThreads)
    pool_fwd_tile_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                         const float* __restrict__ kt, float scale, PoolShape sh, int tile_rows,
                         int64_t tiles, bool staged, float* __restrict__ part_m,
                         float* __restrict__ part_s, float* __restrict__ part_acc) {
  extern __shared__ float staged_kt[];
  __shared__ float w[kMaxTileRows][NH];          // scores, then their exp weights
  __shared__ float head_m[NH];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t l0 = tile * tile_rows;
  const int rows = static_cast<int>(sh.L - l0 < tile_rows ? sh.L - l0 : tile_rows);
  const float* K = stage(kt + s * sh.H * sh.D, sh.H * sh.D, staged, staged_kt);
  __syncthreads();
  const T* fimg = f + sb * sh.L * sh.D;
  for (int r = warp; r < rows; r += kTileWarps) {
    const int64_t l = l0 + r;
    float acc[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) acc[h] = 0.0f;
    for (int64_t d = lane; d < sh.D; d += 32) {
      const float v = to_f32<T>(fimg[l * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]);
#pragma unroll
      for (int h = 0; h < NH; ++h)
        if (h < sh.H) acc[h] = fmaf(v, K[h * sh.D + d], acc[h]);
    }
#pragma unroll
    for (int h = 0; h < NH; ++h) acc[h] = warp_sum(acc[h]);
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < NH; ++h)
        if (h < sh.H) w[r][h] = acc[h] * scale;
    }
  }
  __syncthreads();
  const int64_t part = (sb * tiles + tile) * sh.H;
  if (threadIdx.x < sh.H) {
    const int h = threadIdx.x;
    float m = -INFINITY;
    for (int r = 0; r < rows; ++r) m = fmaxf(m, w[r][h]);
    float sum = 0.0f;
    for (int r = 0; r < rows; ++r) sum += expf(w[r][h] - m);
    head_m[h] = m;
    part_m[part + h] = m;
    part_s[part + h] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * sh.H; i += kTileThreads) {
    const int r = i / static_cast<int>(sh.H), h = i % static_cast<int>(sh.H);
    w[r][h] = expf(w[r][h] - head_m[h]);
  }
  __syncthreads();
  tile_weighted_sums<T, NH>(fimg, pos, sh, l0, rows, w, part_acc + part * sh.D);
}

// For i = sb*H + h: m = max over tiles of part_m, den = sum_t part_s[t] exp(part_m[t] - m),
// lse[i] = m + log(den), sbar[i, d] = sum_t exp(part_m[t] - m) part_acc[t, d] / den. Grid
// (S*B*H, column tiles); blocks of kCols columns x kPhases tile phases, added in a fixed order.
__global__ void __launch_bounds__(kCols * kPhases)
    pool_fwd_combine_kernel(const float* __restrict__ part_m, const float* __restrict__ part_s,
                            const float* __restrict__ part_acc, PoolShape sh, int64_t tiles,
                            float* __restrict__ sbar, float* __restrict__ lse) {
  __shared__ float red[kPhases][kCols + 1];
  __shared__ float m_all, den_all;
  const int tid = threadIdx.y * kCols + threadIdx.x;
  const int64_t i = blockIdx.x, sb = i / sh.H, h = i % sh.H;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const float* pm = part_m + sb * tiles * sh.H + h;      // tile t at pm[t * H]
  const float* ps = part_s + sb * tiles * sh.H + h;
  if (tid < 32) {
    float m = -INFINITY;
    for (int64_t t = tid; t < tiles; t += 32) m = fmaxf(m, pm[t * sh.H]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float den = 0.0f;
    for (int64_t t = tid; t < tiles; t += 32) den += ps[t * sh.H] * expf(pm[t * sh.H] - m);
    den = warp_sum(den);
    if (tid == 0) {
      m_all = m;
      den_all = den;
      if (blockIdx.y == 0) lse[i] = m + logf(den);
    }
  }
  __syncthreads();
  const float m = m_all;
  float acc = 0.0f;
  if (d < sh.D) {
    for (int64_t t = threadIdx.y; t < tiles; t += kPhases)
      acc = fmaf(expf(pm[t * sh.H] - m), part_acc[((sb * tiles + t) * sh.H + h) * sh.D + d], acc);
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < sh.D) {
    float t = red[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kPhases; ++k) t += red[k][threadIdx.x];
    sbar[i * sh.D + d] = t / den_all;
  }
}

// Backward, one block per (image sb, tile of rows): per row (one warp each) a[h], c[h] and df_l;
// then partial[(sb*tiles + tile), h, d] = sum over the tile's rows of scale c[h,l] kv[l, d].
template <typename T, typename TD, int NH>
__global__ void __launch_bounds__(kTileThreads)
    pool_bwd_tile_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                         const float* __restrict__ kt, float scale, PoolShape sh,
                         const float* __restrict__ sbar, const float* __restrict__ lse,
                         const float* __restrict__ dsbar, int tile_rows, int64_t tiles, bool staged,
                         TD* __restrict__ df, float* __restrict__ partial) {
  extern __shared__ float staged_kd[];
  __shared__ float cs[kMaxTileRows][NH];         // scale * c of the tile's rows
  __shared__ float sd[NH], lse_h[NH];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t l0 = tile * tile_rows;
  const int rows = static_cast<int>(sh.L - l0 < tile_rows ? sh.L - l0 : tile_rows);
  const int64_t hd = sh.H * sh.D;
  const float* K = stage(kt + s * hd, hd, staged, staged_kd);
  const float* DS = stage(dsbar + sb * hd, hd, staged, staged_kd + hd);
  for (int64_t h = warp; h < sh.H; h += kTileWarps) {    // sbar_h . dsbar_h
    const float* a = sbar + (sb * sh.H + h) * sh.D;
    const float* b = dsbar + (sb * sh.H + h) * sh.D;
    float acc = 0.0f;
    for (int64_t d = lane; d < sh.D; d += 32) acc = fmaf(a[d], b[d], acc);
    acc = warp_sum(acc);
    if (lane == 0) {
      sd[h] = acc;
      lse_h[h] = lse[sb * sh.H + h];
    }
  }
  __syncthreads();
  const T* fimg = f + sb * sh.L * sh.D;
  TD* dimg = df + sb * sh.L * sh.D;
  for (int r = warp; r < rows; r += kTileWarps) {
    const int64_t l = l0 + r;
    float dk[NH], dd[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) dk[h] = dd[h] = 0.0f;
    for (int64_t d = lane; d < sh.D; d += 32) {
      const float v = to_f32<T>(fimg[l * sh.D + d]) + to_f32<T>(pos[l * sh.D + d]);
#pragma unroll
      for (int h = 0; h < NH; ++h) {
        if (h < sh.H) {
          dk[h] = fmaf(v, K[h * sh.D + d], dk[h]);
          dd[h] = fmaf(v, DS[h * sh.D + d], dd[h]);
        }
      }
    }
    float ca[NH], cc[NH];
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      ca[h] = cc[h] = 0.0f;
      if (h < sh.H) {
        const float a = expf(warp_sum(dk[h]) * scale - lse_h[h]);
        ca[h] = a;
        cc[h] = a * (warp_sum(dd[h]) - sd[h]) * scale;
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < NH; ++h)
        if (h < sh.H) cs[r][h] = cc[h];
    }
    for (int64_t d = lane; d < sh.D; d += 32) {
      float g = 0.0f;
#pragma unroll
      for (int h = 0; h < NH; ++h)
        if (h < sh.H) g = fmaf(ca[h], DS[h * sh.D + d], fmaf(cc[h], K[h * sh.D + d], g));
      dimg[l * sh.D + d] = from_f32<TD>(g);
    }
  }
  __syncthreads();
  const int64_t part = (sb * tiles + tile) * sh.H;
  tile_weighted_sums<T, NH>(fimg, pos, sh, l0, rows, cs, partial + part * sh.D);
}

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

// Dynamic shared memory of a launch (kt, or kt and dsbar, staged) and whether it is staged.
int staged_bytes(PoolShape sh, int copies, bool* staged) {
  const int64_t bytes = copies * sh.H * sh.D * static_cast<int64_t>(sizeof(float));
  *staged = bytes <= kMaxStagedBytes;
  return *staged ? static_cast<int>(bytes) : 0;
}

// Opts a kernel into `bytes` of dynamic shared memory: beyond 48 KB *with* the static shared
// memory a launch fails without it (per launch: the attribute is per device; a host call, legal
// while a stream is captured).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes == 0) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// The grid of a tile kernel: tiles per image and blocks (one per image and tile); false when the
// shape or the tile is out of range.
bool tile_grid(PoolShape sh, int tile_rows, int64_t* tiles, int64_t* blocks);

// kernel<<<blocks, kTileThreads, smem>>>(args...) with `smem` bytes of staged operands allowed.
template <typename Kernel, typename... Args>
cudaError_t launch_tiles(Kernel kernel, int64_t blocks, int smem, cudaStream_t stream, Args... args) {
  const cudaError_t e = allow_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(blocks), kTileThreads, smem, stream>>>(args...);
  return launch_status();
}

}  // namespace

int pool_tile_rows(PoolShape sh, int sm_count) {
  // 8 rows (one per warp) while the tiles of all images do not fill two waves of blocks; larger
  // tiles (fewer partials to merge) when there are images enough
  const int64_t images = sh.S * sh.B, want = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 132);
  int rows = kTileWarps;
  while (rows < kMaxTileRows && images * ceil_div(sh.L, 2 * rows) >= want) rows *= 2;
  return rows;
}

int64_t pool_tiles(PoolShape sh, int tile_rows) { return ceil_div(sh.L, tile_rows); }

namespace {
bool tile_grid(PoolShape sh, int tile_rows, int64_t* tiles, int64_t* blocks) {
  if (!shape_ok(sh) || tile_rows < kTileWarps || tile_rows > kMaxTileRows || tile_rows % kTileWarps) return false;
  *tiles = pool_tiles(sh, tile_rows);
  *blocks = sh.S * sh.B * *tiles;
  return *blocks <= 0x7fffffff;
}
}  // namespace

cudaError_t pool_fwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, int tile_rows, float* part_m, float* part_s, float* part_acc,
                     float* sbar, float* lse, cudaStream_t stream) {
  int64_t tiles = 0, blocks = 0;
  if (!tile_grid(sh, tile_rows, &tiles, &blocks)) return cudaErrorInvalidValue;
  bool staged = false;
  const int smem = staged_bytes(sh, 1, &staged);
  cudaError_t e = APM_DISPATCH_DTYPE(t, T, [&] {
    cudaError_t err = cudaSuccess;
    with_heads(sh.H, [&](auto nh) {
      err = launch_tiles(pool_fwd_tile_kernel<T, decltype(nh)::value>, blocks, smem, stream,
                         static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, tile_rows, tiles,
                         staged, part_m, part_s, part_acc);
    });
    return err;
  });
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(sh.S * sh.B * sh.H), static_cast<unsigned>(ceil_div(sh.D, kCols)));
  pool_fwd_combine_kernel<<<grid, dim3(kCols, kPhases), 0, stream>>>(part_m, part_s, part_acc, sh, tiles,
                                                                     sbar, lse);
  return launch_status();
}

cudaError_t pool_bwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, const float* sbar, const float* lse, const float* dsbar,
                     void* df, DType df_t, float* dkt, int tile_rows, float* partial,
                     cudaStream_t stream) {
  int64_t tiles = 0, blocks = 0;
  if (!tile_grid(sh, tile_rows, &tiles, &blocks)) return cudaErrorInvalidValue;
  bool staged = false;
  const int smem = staged_bytes(sh, 2, &staged);
  cudaError_t e = APM_DISPATCH_DTYPE(t, T, [&] {
    return APM_DISPATCH_DTYPE(df_t, TD, [&] {
      cudaError_t err = cudaSuccess;
      with_heads(sh.H, [&](auto nh) {
        err = launch_tiles(pool_bwd_tile_kernel<T, TD, decltype(nh)::value>, blocks, smem, stream,
                           static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, sbar, lse, dsbar,
                           tile_rows, tiles, staged, static_cast<TD*>(df), partial);
      });
      return err;
    });
  });
  if (e != cudaSuccess) return e;
  // dkt[s] = sum over the B * tiles partials of student s (H*D columns)
  return colsum(partial, DType::kFloat32, sh.S, sh.B * tiles, sh.H * sh.D, dkt, sh.H * sh.D, nullptr, 1,
                1.0f, stream);
}

}  // namespace apm
