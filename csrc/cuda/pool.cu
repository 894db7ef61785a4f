// Single-query attention pool (spec section 3), forward and backward, fp32 arithmetic.
//
// With kv = f + pos_out and one query per head (k~_h = W_k,h^T q_h, given as kt):
//   score[h,l] = scale kt_h . kv_l;  a = softmax_l(score);  sbar_h = sum_l a[h,l] kv_l
// Backward, c[h,l] = a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
//   df_l = sum_h a[h,l] dsbar_h + scale c[h,l] kt_h;   dkt_h = scale sum_{b,l} c[h,l] kv_l
//
// The pool moves ~1.5 MB per image: at one image it is bound by latency, not bandwidth, so the
// kernels keep many loads in flight instead of waiting for each: a warp loads its row of f and
// pos_out 16 bytes per lane (kBatch vectors of each at once) into shared memory, the staging of
// kt (and dsbar) has kStageBatch 16-byte loads per thread in flight, and the sums over columns
// and over tiles load their operands in batches. Both directions
// run one block of 8 warps per *tile* of rows of one image (pool_tile_rows: 8 rows at one image,
// 128 blocks; up to 64 rows when there are images enough to fill the GPU), in rounds of 8 rows,
// one row per warp:
//   forward   tile     every head's score of the round's rows from one read of kv_l (kt staged in
//                      shared memory); the rows' kv go to shared memory, and the threads, each
//                      owning a few columns, keep every head's exp-weighted sum with an online
//                      (running-max) softmax across rounds: one read of kv per tile and head set;
//                      the tile's (max, sum of exp, weighted sum) per head is its partial
//             combine  per (image, head, 128 columns): the tiles' partials merged exactly
//                      (rescaled to the overall max), giving lse and sbar
//   backward  tile     kt and dsbar staged, sbar . dsbar per head; per row a, c and df_l; the
//                      round's kv and c in shared memory, the threads (a few columns each) keep
//                      the tile's partial key gradient sum_l c kv_l in shared memory
//             colsum   the tiles' partial key gradients summed per student (colsum.cu)
// Each thread keeps registers per head: the kernels are compiled for at most 8 heads (every
// preset) and for kPoolMaxHeads; D is at most kPoolMaxWidth (shared memory holds the tile's
// accumulators, H*D, and a round's rows, 8*D).
// No atomics anywhere: every sum has a fixed order, so the same inputs give the same bits.
// On the H200 at `ttt-l14`'s shape (benchmarks/results/h200/suite/primitives.json and
// 10b1643-primitives/): one image, forward 16.8 us, backward 22.1 (the kernels this replaced,
// which waited for each load before the next: 19.2 and 33.2); 64 images, forward 0.435 ms
// (0.319: two blocks of 8 warps per SM and three barriers a round cost more there than the
// second read of kv did), backward 0.574 ms (0.749).
#include <type_traits>

#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

constexpr int kTileWarps = 8;                    // warps per block of the tile kernels = rows per round
constexpr int kTileThreads = kTileWarps * 32;
constexpr int kMaxTileRows = 64;                 // rows per tile: a multiple of kTileWarps
constexpr int kCols = 32;                        // columns per block of the combine kernel
constexpr int kPhases = 8;                       // tile phases per block of the combine kernel
constexpr int kColSteps = 4;                     // columns per thread of the combine kernel, kCols apart
constexpr int kUnroll = 8;                       // tiles per phase whose loads the combine keeps in flight
constexpr int kMaxSmemBytes = 200 * 1024;       // dynamic shared memory of a tile block, at most
constexpr int kStageBatch = 12;                  // loads in flight per thread and array while staging
constexpr int kDotBatch = 24;                   // columns in flight per lane in sbar . dsbar
constexpr int kBatch = 2;                        // vectors in flight per lane and array while loading a row

// Two blocks per SM (at most 128 registers per thread) for the usual head counts.
template <int NH>
constexpr int kBlocksPerSm = NH <= 8 ? 2 : 1;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Copies n floats from src to dst (shared memory), and n from src2 to dst2 when src2 is given:
// every thread keeps kStageBatch loads (16 bytes each when the arrays allow it) of each array in
// flight at a time (a plain loop would wait for each load before issuing the next).
template <typename Vec>
__device__ __forceinline__ void stage_as(const float* __restrict__ src, float* __restrict__ dst,
                                         const float* __restrict__ src2, float* __restrict__ dst2, int64_t n) {
  constexpr int kPer = sizeof(Vec) / sizeof(float);
  const Vec* a = reinterpret_cast<const Vec*>(src);
  const Vec* b = reinterpret_cast<const Vec*>(src2);
  const int64_t nv = n / kPer;
  for (int64_t i0 = threadIdx.x; i0 < nv; i0 += kStageBatch * kTileThreads) {
    Vec ra[kStageBatch], rb[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int64_t i = i0 + u * kTileThreads;
      if (i < nv) {
        ra[u] = a[i];
        if (src2) rb[u] = b[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int64_t i = i0 + u * kTileThreads;
      if (i < nv) {
        reinterpret_cast<Vec*>(dst)[i] = ra[u];
        if (src2) reinterpret_cast<Vec*>(dst2)[i] = rb[u];
      }
    }
  }
}

__device__ __forceinline__ void stage(const float* __restrict__ src, float* __restrict__ dst,
                                      const float* __restrict__ src2, float* __restrict__ dst2, int64_t n) {
  const bool vec = n % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                   (!src2 || reinterpret_cast<uintptr_t>(src2) % 16 == 0);
  if (vec) {
    stage_as<float4>(src, dst, src2, dst2, n);   // the shared arrays start 16-byte aligned (H*D % 4 == 0)
  } else {
    stage_as<float>(src, dst, src2, dst2, n);
  }
}

// Row l of kv = f + pos, in fp32, to the warp's row `out` of shared memory. A lane loads V
// adjacent elements at a time (16 bytes when the rows allow it), kBatch such vectors of f and of
// pos in flight together: one wait for a row of up to 32 V kBatch columns.
template <typename T, int V>
__device__ __forceinline__ void load_row(const T* __restrict__ frow, const T* __restrict__ prow, int64_t D,
                                         int lane, float* __restrict__ out) {
  struct alignas(sizeof(T) * V) Pack {
    T x[V];
  };
  for (int64_t c0 = lane * V; c0 < D; c0 += 32 * V * kBatch) {
    Pack a[kBatch], b[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + u * 32 * V;
      if (c < D) {               // V > 1 only when D is a multiple of V: the whole vector is in range
        a[u] = *reinterpret_cast<const Pack*>(frow + c);
        b[u] = *reinterpret_cast<const Pack*>(prow + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + u * 32 * V;
      if (c < D) {
#pragma unroll
        for (int e = 0; e < V; ++e) out[c + e] = to_f32<T>(a[u].x[e]) + to_f32<T>(b[u].x[e]);
      }
    }
  }
}

// dk[h] = sum_d row[d] M1[h * D + d] (and dd[h] with M2 when M2 is given) over the lane's columns
// d = lane + 32 i, every head h < H; not yet summed over the warp.
template <int NH>
__device__ __forceinline__ void head_dots(const float* __restrict__ row, const float* __restrict__ M1,
                                          const float* __restrict__ M2, int64_t D, int64_t H, int lane,
                                          float (&dk)[NH], float (&dd)[NH]) {
#pragma unroll
  for (int h = 0; h < NH; ++h) dk[h] = dd[h] = 0.0f;
#pragma unroll 2
  for (int64_t c = lane; c < D; c += 32) {
    const float v = row[c];
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      if (h < H) {
        dk[h] = fmaf(v, M1[h * D + c], dk[h]);
        if (M2) dd[h] = fmaf(v, M2[h * D + c], dd[h]);
      }
    }
  }
}

// A warp's share of a round: row l of kv (image fimg) to `row` in shared memory, then its head
// dot products with M1 (and M2) as head_dots gives them.
template <typename T, int V, int NH>
__device__ __forceinline__ void row_dots(const T* __restrict__ fimg, const T* __restrict__ pos, int64_t l,
                                         float* __restrict__ row, const float* __restrict__ M1,
                                         const float* __restrict__ M2, int64_t D, int64_t H, int lane,
                                         float (&dk)[NH], float (&dd)[NH]) {
  load_row<T, V>(fimg + l * D, pos + l * D, D, lane, row);
  __syncwarp();
  head_dots<NH>(row, M1, M2, D, H, lane, dk, dd);
}

// acc[h * D + d] = acc[h * D + d] * rescale[h] + sum over the round's nr rows r of
// w[r][h] kvs[r * D + d], every column d (threads over d, each its own columns: no races) and
// head h < H; rescale null: 1.
template <int NH>
__device__ __forceinline__ void round_sums(const float* __restrict__ kvs, const float (*w)[NH],
                                           const float* rescale, int nr, int64_t D, int64_t H,
                                           float* __restrict__ acc) {
  float wr[kTileWarps][NH], sc[NH];              // the round's weights, read once per thread
#pragma unroll
  for (int h = 0; h < NH; ++h) {
    sc[h] = rescale && h < H ? rescale[h] : 1.0f;
#pragma unroll
    for (int r = 0; r < kTileWarps; ++r) wr[r][h] = r < nr && h < H ? w[r][h] : 0.0f;
  }
  for (int64_t d = threadIdx.x; d < D; d += kTileThreads) {
    float x[kTileWarps];
#pragma unroll
    for (int r = 0; r < kTileWarps; ++r) x[r] = r < nr ? kvs[r * D + d] : 0.0f;
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      if (h < H) {
        float a = acc[h * D + d] * sc[h];
#pragma unroll
        for (int r = 0; r < kTileWarps; ++r)
          if (r < nr) a = fmaf(wr[r][h], x[r], a);
        acc[h * D + d] = a;
      }
    }
  }
}

__device__ __forceinline__ void zero(float* __restrict__ p, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += kTileThreads) p[i] = 0.0f;
}

__device__ __forceinline__ void copy_out(const float* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = threadIdx.x; i < n; i += kTileThreads) dst[i] = src[i];
}

// Forward, one block per (image sb, tile of rows): per head h, over the tile's rows,
// m = max score, s = sum exp(score - m), acc[d] = sum exp(score - m) kv[d]; written to
// part_m / part_s ((S*B, tiles, H)) and part_acc ((S*B, tiles, H, D)). Dynamic shared memory:
// [kt of the student (H*D, when staged)][acc (H*D)][the round's kv rows (kTileWarps*D)].
template <typename T, int V, int NH>
__global__ void __launch_bounds__(kTileThreads, kBlocksPerSm<NH>)
    pool_fwd_tile_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                         const float* __restrict__ kt, float scale, PoolShape sh, int tile_rows,
                         int64_t tiles, bool staged, float* __restrict__ part_m,
                         float* __restrict__ part_s, float* __restrict__ part_acc) {
  extern __shared__ float smem[];
  __shared__ float w[kTileWarps][NH];            // the round's scores (log2 domain), then weights
  __shared__ float head_m[NH], head_s[NH], alpha[NH];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t D = sh.D, H = sh.H;
  const int64_t l0 = tile * tile_rows;
  const int rows = static_cast<int>(sh.L - l0 < tile_rows ? sh.L - l0 : tile_rows);
  const float* K = kt + s * H * D;
  float* acc = smem;
  if (staged) {
    stage(K, smem, nullptr, nullptr, H * D);
    K = smem;
    acc = smem + H * D;
  }
  float* kvs = acc + H * D;
  zero(acc, H * D);
  if (threadIdx.x < NH) {
    head_m[threadIdx.x] = -INFINITY;
    head_s[threadIdx.x] = 0.0f;
  }
  const float scale2 = scale * 1.4426950408889634f;   // exp2 is the native instruction
  const T* fimg = f + sb * sh.L * D;
  __syncthreads();
  for (int r0 = 0; r0 < rows; r0 += kTileWarps) {
    const int nr = rows - r0 < kTileWarps ? rows - r0 : kTileWarps;
    if (warp < nr) {
      float dot[NH], unused[NH];
      row_dots<T, V, NH>(fimg, pos, l0 + r0 + warp, kvs + warp * D, K, nullptr, D, H, lane, dot, unused);
#pragma unroll
      for (int h = 0; h < NH; ++h) dot[h] = warp_sum(dot[h]);
      if (lane == 0) {
#pragma unroll
        for (int h = 0; h < NH; ++h)
          if (h < H) w[warp][h] = dot[h] * scale2;
      }
    }
    __syncthreads();
    if (threadIdx.x < H) {                       // the online softmax's step, per head
      const int h = threadIdx.x;
      float m = head_m[h];
      for (int r = 0; r < nr; ++r) m = fmaxf(m, w[r][h]);
      const float a = exp2f(head_m[h] - m);      // 0 on the first round (-inf)
      float sum = head_s[h] * a;
      for (int r = 0; r < nr; ++r) {
        const float p = exp2f(w[r][h] - m);
        w[r][h] = p;
        sum += p;
      }
      head_m[h] = m;
      head_s[h] = sum;
      alpha[h] = a;
    }
    __syncthreads();
    round_sums<NH>(kvs, w, alpha, nr, D, H, acc);
    __syncthreads();                             // before the next round overwrites kvs and w
  }
  const int64_t part = (sb * tiles + tile) * H;
  if (threadIdx.x < H) {
    part_m[part + threadIdx.x] = head_m[threadIdx.x] * 0.6931471805599453f;   // natural log domain
    part_s[part + threadIdx.x] = head_s[threadIdx.x];
  }
  copy_out(acc, H * D, part_acc + part * D);
}

// For i = sb*H + h: m = max over tiles of part_m, den = sum_t part_s[t] exp(part_m[t] - m),
// lse[i] = m + log(den), sbar[i, d] = sum_t exp(part_m[t] - m) part_acc[t, d] / den. Grid
// (S*B*H, column blocks of kCols * kColSteps); blocks of kCols columns x kPhases tile phases,
// each thread kColSteps columns kCols apart, added in a fixed order (kUnroll tiles x kColSteps
// columns of loads in flight a thread). One column a thread (blocks of 32 columns) made 12,288
// blocks at 64 students, each a chain of dependent loads: 144 us against 14.5 for the Triton
// merge (one program per head over all of D); 32 us now, and 3.7 us at one image against 4.9
// (benchmarks/results/h200/6245dad-cuda-pool-merge/).
__global__ void __launch_bounds__(kCols * kPhases)
    pool_fwd_combine_kernel(const float* __restrict__ part_m, const float* __restrict__ part_s,
                            const float* __restrict__ part_acc, PoolShape sh, int64_t tiles,
                            float* __restrict__ sbar, float* __restrict__ lse) {
  constexpr int kWidth = kCols * kColSteps;      // columns per block
  __shared__ float red[kPhases][kWidth + 1];
  __shared__ float m_all, den_all;
  const int tid = threadIdx.y * kCols + threadIdx.x;
  const int64_t i = blockIdx.x, sb = i / sh.H, h = i % sh.H;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kWidth;
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
  const float* acc_h = part_acc + (sb * tiles * sh.H + h) * sh.D + d0 + threadIdx.x;   // tile t at t * H * D
  float acc[kColSteps];
#pragma unroll
  for (int c = 0; c < kColSteps; ++c) acc[c] = 0.0f;
  for (int64_t t0 = threadIdx.y; t0 < tiles; t0 += kUnroll * kPhases) {
    float wt[kUnroll], x[kUnroll][kColSteps];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = t0 + u * kPhases;
      wt[u] = t < tiles ? pm[t * sh.H] : -INFINITY;
#pragma unroll
      for (int c = 0; c < kColSteps; ++c)
        x[u][c] = t < tiles && d0 + threadIdx.x + c * kCols < sh.D ? acc_h[t * sh.H * sh.D + c * kCols] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float e = expf(wt[u] - m);
#pragma unroll
      for (int c = 0; c < kColSteps; ++c) acc[c] = fmaf(e, x[u][c], acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kColSteps; ++c) red[threadIdx.y][threadIdx.x + c * kCols] = acc[c];
  __syncthreads();
  for (int j = tid; j < kWidth; j += kCols * kPhases) {
    if (d0 + j < sh.D) {
      float t = red[0][j];
#pragma unroll
      for (int k = 1; k < kPhases; ++k) t += red[k][j];
      sbar[i * sh.D + d0 + j] = t / den_all;
    }
  }
}

// Backward, one block per (image sb, tile of rows): per row (one warp each) a[h], c[h] and df_l;
// the tile's partial[(sb*tiles + tile), h, d] = sum over its rows of scale c[h,l] kv[l, d].
// Dynamic shared memory: [kt, dsbar (2*H*D, when staged)][acc (H*D)][the round's kv rows
// (kTileWarps*D)]. df is written in f's dtype, or as float when df_f32.
template <typename T, int V, int NH>
__global__ void __launch_bounds__(kTileThreads, kBlocksPerSm<NH>)
    pool_bwd_tile_kernel(const T* __restrict__ f, const T* __restrict__ pos,
                         const float* __restrict__ kt, float scale, PoolShape sh,
                         const float* __restrict__ sbar, const float* __restrict__ lse,
                         const float* __restrict__ dsbar, int tile_rows, int64_t tiles, bool staged,
                         void* __restrict__ df, bool df_f32, float* __restrict__ partial) {
  extern __shared__ float smem[];
  __shared__ float cs[kTileWarps][NH];           // scale * c of the round's rows
  __shared__ float sd[NH], lse_h[NH];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t D = sh.D, H = sh.H, hd = H * D;
  const int64_t l0 = tile * tile_rows;
  const int rows = static_cast<int>(sh.L - l0 < tile_rows ? sh.L - l0 : tile_rows);
  const float* K = kt + s * hd;
  const float* DS = dsbar + sb * hd;
  float* acc = smem;
  if (staged) {
    stage(K, smem, DS, smem + hd, hd);
    K = smem;
    DS = smem + hd;
    acc = smem + 2 * hd;
  }
  float* kvs = acc + hd;
  zero(acc, hd);
  for (int64_t h = warp; h < H; h += kTileWarps) {     // sbar_h . dsbar_h
    const float* a = sbar + (sb * H + h) * D;
    const float* b = dsbar + (sb * H + h) * D;
    float dot = 0.0f;
    for (int64_t c0 = lane; c0 < D; c0 += 32 * kDotBatch) {   // kDotBatch columns' loads in flight
      float x[kDotBatch], y[kDotBatch];
#pragma unroll
      for (int u = 0; u < kDotBatch; ++u) {
        const int64_t c = c0 + u * 32;
        x[u] = c < D ? a[c] : 0.0f;
        y[u] = c < D ? b[c] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kDotBatch; ++u) dot = fmaf(x[u], y[u], dot);
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      sd[h] = dot;
      lse_h[h] = lse[sb * H + h];
    }
  }
  const T* fimg = f + sb * sh.L * D;
  __syncthreads();
  for (int r0 = 0; r0 < rows; r0 += kTileWarps) {
    const int nr = rows - r0 < kTileWarps ? rows - r0 : kTileWarps;
    if (warp < nr) {
      const int64_t l = l0 + r0 + warp;
      float ca[NH], cc[NH];
      row_dots<T, V, NH>(fimg, pos, l, kvs + warp * D, K, DS, D, H, lane, ca, cc);
#pragma unroll
      for (int h = 0; h < NH; ++h) {
        float a = 0.0f, c = 0.0f;
        if (h < H) {
          a = expf(warp_sum(ca[h]) * scale - lse_h[h]);
          c = a * (warp_sum(cc[h]) - sd[h]) * scale;
        }
        ca[h] = a;
        cc[h] = c;
      }
      if (lane == 0) {
#pragma unroll
        for (int h = 0; h < NH; ++h)
          if (h < H) cs[warp][h] = cc[h];
      }
      const int64_t out = (sb * sh.L + l) * D;
#pragma unroll 2
      for (int64_t c = lane; c < D; c += 32) {
        float g = 0.0f;
#pragma unroll
        for (int h = 0; h < NH; ++h)
          if (h < H) g = fmaf(ca[h], DS[h * D + c], fmaf(cc[h], K[h * D + c], g));
        if (df_f32) {
          static_cast<float*>(df)[out + c] = g;
        } else {
          static_cast<T*>(df)[out + c] = from_f32<T>(g);
        }
      }
    }
    __syncthreads();
    round_sums<NH>(kvs, cs, nullptr, nr, D, H, acc);
    __syncthreads();                             // before the next round overwrites kvs and cs
  }
  copy_out(acc, hd, partial + (sb * tiles + tile) * hd);
}

bool shape_ok(const PoolShape& sh) {
  // kPoolMaxWidth with kPoolMaxHeads: (16 + 8) * 2048 floats = 192 KB of accumulators and rows
  static_assert((kPoolMaxHeads + kTileWarps) * kPoolMaxWidth * sizeof(float) <= kMaxSmemBytes, "");
  return sh.S > 0 && sh.B > 0 && sh.L > 0 && sh.D > 0 && sh.D <= kPoolMaxWidth && sh.H > 0 &&
         sh.H <= kPoolMaxHeads;
}

// fn(V, NH) as std::integral_constants: V elements per load (16 bytes when D is a multiple of
// that and both row arrays are 16-byte aligned, else 1), NH heads of registers (8 when H <= 8,
// every preset; else kPoolMaxHeads).
template <typename T, typename Fn>
void with_layout(const PoolShape& sh, const void* f, const void* pos, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = sh.D % kVec == 0 && reinterpret_cast<uintptr_t>(f) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(pos) % 16 == 0;
  auto heads = [&](auto v) {
    if (sh.H <= 8) {
      fn(v, std::integral_constant<int, 8>{});
    } else {
      fn(v, std::integral_constant<int, kPoolMaxHeads>{});
    }
  };
  if (vec) {
    heads(std::integral_constant<int, kVec>{});
  } else {
    heads(std::integral_constant<int, 1>{});
  }
}

// Dynamic shared memory of a tile launch: the accumulators (H*D) and a round's kv rows
// (kTileWarps*D), plus `copies` H*D operands when they fit too (*staged says whether).
int smem_bytes(PoolShape sh, int copies, bool* staged) {
  const int64_t f = static_cast<int64_t>(sizeof(float));
  const int64_t base = (sh.H + kTileWarps) * sh.D * f, operands = copies * sh.H * sh.D * f;
  *staged = base + operands <= kMaxSmemBytes;
  return static_cast<int>(base + (*staged ? operands : 0));
}

// Opts a kernel into `bytes` of dynamic shared memory: beyond 48 KB *with* the static shared
// memory a launch fails without it (per launch: the attribute is per device; a host call, legal
// while a stream is captured).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// The grid of a tile kernel: tiles per image and blocks (one per image and tile); false when the
// shape or the tile is out of range.
bool tile_grid(PoolShape sh, int tile_rows, int64_t* tiles, int64_t* blocks);

// kernel<<<blocks, kTileThreads, smem>>>(args...) with `smem` bytes of dynamic shared memory allowed.
template <typename Kernel, typename... Args>
cudaError_t launch_tiles(Kernel kernel, int64_t blocks, int smem, cudaStream_t stream, Args... args) {
  const cudaError_t e = allow_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(blocks), kTileThreads, smem, stream>>>(args...);
  return launch_status();
}

}  // namespace

int pool_tile_rows(PoolShape sh, int sm_count) {
  // 8 rows (one round) while the tiles of all images do not fill two waves of blocks; larger
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
  const int smem = smem_bytes(sh, 1, &staged);
  cudaError_t e = APM_DISPATCH_DTYPE(t, T, [&] {
    cudaError_t err = cudaSuccess;
    with_layout<T>(sh, f, pos, [&](auto v, auto nh) {
      err = launch_tiles(pool_fwd_tile_kernel<T, decltype(v)::value, decltype(nh)::value>, blocks, smem, stream,
                         static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, tile_rows, tiles,
                         staged, part_m, part_s, part_acc);
    });
    return err;
  });
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(sh.S * sh.B * sh.H), static_cast<unsigned>(ceil_div(sh.D, kCols * kColSteps)));
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
  if (df_t != t && df_t != DType::kFloat32) return cudaErrorInvalidValue;
  bool staged = false;
  const int smem = smem_bytes(sh, 2, &staged);
  cudaError_t e = APM_DISPATCH_DTYPE(t, T, [&] {
    cudaError_t err = cudaSuccess;
    with_layout<T>(sh, f, pos, [&](auto v, auto nh) {
      err = launch_tiles(pool_bwd_tile_kernel<T, decltype(v)::value, decltype(nh)::value>, blocks, smem, stream,
                         static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, sbar, lse, dsbar,
                         tile_rows, tiles, staged, df, df_t == DType::kFloat32, partial);
    });
    return err;
  });
  if (e != cudaSuccess) return e;
  // dkt[s] = sum over the B * tiles partials of student s (H*D columns)
  return colsum(partial, DType::kFloat32, sh.S, sh.B * tiles, sh.H * sh.D, dkt, sh.H * sh.D, nullptr, 1,
                1.0f, stream);
}

}  // namespace apm
