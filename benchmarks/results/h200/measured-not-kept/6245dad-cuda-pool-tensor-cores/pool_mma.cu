// Single-query attention pool (spec section 3), forward and backward, every head at once on the
// tensor cores.
//
// With kv = f + pos_out and one query per head (k~_h = W_k,h^T q_h, given as kt):
//   score[h,l] = scale kt_h . kv_l;  a = softmax_l(score);  sbar_h = sum_l a[h,l] kv_l
// Backward, c[h,l] = scale a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
//   df_l = sum_h a[h,l] dsbar_h + c[h,l] kt_h;   dkt_h = sum_{b,l} c[h,l] kv_l
//
// A block of 4 warps takes a tile of R rows of one image (pool_tile_rows: 64 when the images fill
// two waves of blocks, else 32 or 16) and every head at once, the heads padded to 16 (the width
// of a product); D is walked in slices of 64 columns, each slice of kv (f + pos_out added in fp32)
// and of the (heads x D) operands staged in shared memory:
//   forward   pass 1   scores (R x 16) = kv kt^T, a product per slice accumulated over D (with
//                      R = 16 the four warps take a quarter of each slice's k-steps and add up)
//             softmax  the tile's max, weights and sum per head
//             pass 2   the tile's weighted sums (16 x D) = weights^T kv, the slices read again
//                      (from cache): the tile's (max, sum, weighted sum) per head is its partial
//             combine  per (image, head, 32 columns): the tiles' partials merged exactly
//   backward  pass 1   (R x 16) kv kt^T and kv dsbar^T; then a and c
//             pass 2   per slice, df = a dsbar + c kt (R x 64) and the tile's key gradient
//                      c^T kv (16 x 64), summed over the image's tiles per student by colsum
// f is read twice and written (df) once; no row is reduced across threads.
// The products are tf32 mma (nvcuda::wmma m16n16k8). With kSplit (3xTF32) each operand x is
// hi + lo, hi = tf32(x), lo = tf32(x - hi), and a b = a_hi b_hi + a_hi b_lo + a_lo b_hi: about
// fp32's rounding (the lo lo term is below it). Every sum has a fixed order: the same inputs give
// the same bits.
#include <mma.h>

#include <cstdlib>
#include <type_traits>

#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

namespace wm = nvcuda::wmma;

constexpr int kWarps = 4;                        // warps per tile block
constexpr int kThreads = kWarps * 32;
constexpr int kHp = 16;                          // heads, padded to a product's width
constexpr int kSlice = 64;                       // columns of D per slice
constexpr int kLd = kSlice + 4;                  // row stride of a staged slice (floats; 16-byte multiple)
constexpr int kMaxTileRows = 64;
constexpr int kCols = 32;                        // columns per block of the combine kernel
constexpr int kPhases = 8;                       // tile phases per block of the combine kernel
constexpr int kBatch = 4;                        // loads in flight per thread and array while staging
static_assert(kPoolMaxHeads <= kHp, "the heads are padded to kHp");

using Acc = wm::fragment<wm::accumulator, 16, 16, 8, float>;
using RowA = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::row_major>;
using ColA = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::col_major>;
using RowB = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::row_major>;
using ColB = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::col_major>;

// A tf32 operand (hi) and, with kSplit, the rest of its fp32 value (lo).
template <bool kSplit, typename Frag>
struct Operand {
  Frag hi, lo;
  __device__ __forceinline__ void load(const float* p, unsigned ld) {
    wm::load_matrix_sync(hi, p, ld);
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float x = hi.x[i];
      hi.x[i] = wm::__float_to_tf32(x);
      if constexpr (kSplit) lo.x[i] = wm::__float_to_tf32(x - hi.x[i]);
    }
  }
};

// acc += a b (3xTF32 with kSplit: the small terms first)
template <bool kSplit, typename FA, typename FB>
__device__ __forceinline__ void mma(Acc& acc, const Operand<kSplit, FA>& a, const Operand<kSplit, FB>& b) {
  if constexpr (kSplit) {
    wm::mma_sync(acc, a.lo, b.hi, acc);
    wm::mma_sync(acc, a.hi, b.lo, acc);
  }
  wm::mma_sync(acc, a.hi, b.hi, acc);
}

// dst[r * kLd + c] = f[l0 + r, d0 + c] + pos[l0 + r, d0 + c] in fp32 for the R x kSlice slice
// (0 past `rows` or D). A thread loads V adjacent elements at a time (16 bytes when D and the
// arrays allow it), kBatch vectors of f and of pos in flight together.
template <typename T, int V>
__device__ __forceinline__ void stage_kv(const T* __restrict__ fimg, const T* __restrict__ pos, int64_t l0,
                                         int rows, int R, int64_t d0, int64_t D, float* __restrict__ dst) {
  struct alignas(sizeof(T) * V) Pack {
    T x[V];
  };
  constexpr int kPer = kSlice / V;               // vectors per row
  const int n = R * kPer;
  for (int i0 = threadIdx.x; i0 < n; i0 += kBatch * kThreads) {
    Pack a[kBatch], b[kBatch];
    bool ok[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * kThreads, r = i / kPer;
      const int64_t d = d0 + (i % kPer) * V;
      ok[u] = i < n && r < rows && d < D;        // V > 1 only when D % V == 0: the vector is in range
      if (ok[u]) {
        a[u] = *reinterpret_cast<const Pack*>(fimg + (l0 + r) * D + d);
        b[u] = *reinterpret_cast<const Pack*>(pos + (l0 + r) * D + d);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * kThreads, r = i / kPer, c = (i % kPer) * V;
      if (i < n) {
#pragma unroll
        for (int e = 0; e < V; ++e) dst[r * kLd + c + e] = ok[u] ? to_f32<T>(a[u].x[e]) + to_f32<T>(b[u].x[e]) : 0.0f;
      }
    }
  }
}

// dst[h * kLd + c] = M[h * D + d0 + c] for the kHp x kSlice slice of an (H, D) fp32 matrix (0 for
// heads past H and columns past D); one array, or two (M2 to dst2) at once.
__device__ __forceinline__ void stage_heads(const float* __restrict__ M, float* __restrict__ dst,
                                            const float* __restrict__ M2, float* __restrict__ dst2, int64_t H,
                                            int64_t d0, int64_t D) {
  constexpr int kPer = kHp * kSlice / kThreads;  // 8 elements per thread
  float x[kPer], y[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = threadIdx.x + u * kThreads, h = i / kSlice;
    const int64_t d = d0 + i % kSlice;
    const bool ok = h < H && d < D;
    x[u] = ok ? M[h * D + d] : 0.0f;
    if (M2) y[u] = ok ? M2[h * D + d] : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = threadIdx.x + u * kThreads, h = i / kSlice, c = i % kSlice;
    dst[h * kLd + c] = x[u];
    if (M2) dst2[h * kLd + c] = y[u];
  }
}

// Reductions over groups of 8 adjacent lanes.
__device__ __forceinline__ float max8(float v) {
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float sum8(float v) {
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// out (16 x 16 columns of the slice, from the warp's scratch `tile`, row-major) to
// dst[h * D + d0 + c0 + c] for rows h < nh and columns in D.
__device__ __forceinline__ void write_heads(const float* __restrict__ tile, int64_t nh, float* __restrict__ dst,
                                            int64_t d0, int64_t D, int lane) {
  for (int i = lane; i < nh * 16; i += 32) {
    const int64_t h = i / 16, d = d0 + i % 16;
    if (d < D) dst[h * D + d] = tile[i];
  }
}

// The R x 16 (scale-free) products of pass 1, summed over the warps of each row group, to out
// (row r, head h at out[r * kHp + h]); `part` holds each warp's 16 x 16 tile.
__device__ __forceinline__ float group_total(const float (*part)[256], int r, int h, int G) {
  float v = 0.0f;
  for (int w = r / 16; w < kWarps; w += G) v += part[w][(r % 16) * 16 + h];
  return v;
}

// Forward, one block per (image sb, tile of R rows): per head h over the tile's rows,
// m = max score (natural log domain), s = sum exp(score - m), acc = sum exp(score - m) kv, to
// part_m, part_s ((S*B, tiles, H)) and part_acc ((S*B, tiles, H, D)).
template <typename T, int V, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    pool_fwd_tile_kernel(const T* __restrict__ f, const T* __restrict__ pos, const float* __restrict__ kt,
                         float scale, PoolShape sh, int R, int64_t tiles, float* __restrict__ part_m,
                         float* __restrict__ part_s, float* __restrict__ part_acc) {
  __shared__ __align__(128) float kvs[kMaxTileRows * kLd];
  __shared__ __align__(128) float ks[kHp * kLd];
  __shared__ __align__(128) float part[kWarps][256];   // a warp's 16 x 16 products
  __shared__ __align__(128) float w[kMaxTileRows * kHp];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t D = sh.D, H = sh.H, l0 = tile * R;
  const int rows = static_cast<int>(sh.L - l0 < R ? sh.L - l0 : R);
  const T* fimg = f + sb * sh.L * D;
  const float* K = kt + s * H * D;
  const int G = R / 16, grp = warp % G, ksplit = kWarps / G;   // row groups; warps per group
  // pass 1: scores
  Acc acc;
  wm::fill_fragment(acc, 0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    stage_kv<T, V>(fimg, pos, l0, rows, R, d0, D, kvs);
    stage_heads(K, ks, nullptr, nullptr, H, d0, D);
    __syncthreads();
    for (int k = warp / G; k < kSlice / 8; k += ksplit) {
      Operand<kSplit, RowA> a;
      Operand<kSplit, ColB> b;
      a.load(kvs + grp * 16 * kLd + k * 8, kLd);
      b.load(ks + k * 8, kLd);                   // kt^T: (k, h) at ks[h * kLd + k]
      mma(acc, a, b);
    }
    __syncthreads();
  }
  wm::store_matrix_sync(part[warp], acc, 16, wm::mem_row_major);
  __syncthreads();
  const float scale2 = scale * 1.4426950408889634f;   // exp2 is the native instruction
  for (int i = threadIdx.x; i < R * kHp; i += kThreads) {
    const int r = i / kHp, h = i % kHp;
    w[i] = r < rows && h < H ? group_total(part, r, h, G) * scale2 : -INFINITY;
  }
  __syncthreads();
  {                                              // softmax per head: 8 threads a head
    const int h = threadIdx.x / 8, j = threadIdx.x % 8;
    float m = -INFINITY;
    for (int r = j; r < R; r += 8) m = fmaxf(m, w[r * kHp + h]);
    m = max8(m);
    float sum = 0.0f;
    for (int r = j; r < R; r += 8) {
      const float e = h < H && r < rows ? exp2f(w[r * kHp + h] - m) : 0.0f;
      w[r * kHp + h] = e;
      sum += e;
    }
    sum = sum8(sum);
    if (j == 0 && h < H) {
      const int64_t i = (sb * tiles + tile) * H + h;
      part_m[i] = m * 0.6931471805599453f;       // natural log domain
      part_s[i] = sum;
    }
  }
  // pass 2: the weighted sums, 16 columns a warp
  float* acc_out = part_acc + (sb * tiles + tile) * H * D;
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    __syncthreads();                             // w written; the previous slice's reads done
    stage_kv<T, V>(fimg, pos, l0, rows, R, d0, D, kvs);
    __syncthreads();
    Acc o;
    wm::fill_fragment(o, 0.0f);
    for (int k = 0; k < R / 8; ++k) {
      Operand<kSplit, ColA> a;
      Operand<kSplit, RowB> b;
      a.load(w + k * 8 * kHp, kHp);              // weights^T: (h, r) at w[r * kHp + h]
      b.load(kvs + k * 8 * kLd + warp * 16, kLd);
      mma(o, a, b);
    }
    wm::store_matrix_sync(part[warp], o, 16, wm::mem_row_major);
    __syncwarp();
    write_heads(part[warp], H, acc_out, d0 + warp * 16, D, lane);
  }
}

// For i = sb*H + h: m = max over tiles of part_m, den = sum_t part_s[t] exp(part_m[t] - m),
// lse[i] = m + log(den), sbar[i, d] = sum_t exp(part_m[t] - m) part_acc[t, d] / den. Grid
// (S*B*H, column tiles); blocks of kCols columns x kPhases tile phases, added in a fixed order
// (each phase's loads 16 at a time).
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
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
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
    constexpr int U = 16;
    for (int64_t t0 = threadIdx.y; t0 < tiles; t0 += U * kPhases) {
      float wt[U], x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t t = t0 + u * kPhases;
        wt[u] = t < tiles ? pm[t * sh.H] : -INFINITY;
        x[u] = t < tiles ? part_acc[((sb * tiles + t) * sh.H + h) * sh.D + d] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) acc = fmaf(expf(wt[u] - m), x[u], acc);
    }
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

// Backward, one block per (image sb, tile of R rows): a and c of every row and head, df of the
// tile's rows (f's dtype, or float when df_f32), and the tile's key gradient sum_l c kv_l to
// partial ((S*B, tiles, H, D)).
template <typename T, int V, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    pool_bwd_tile_kernel(const T* __restrict__ f, const T* __restrict__ pos, const float* __restrict__ kt,
                         float scale, PoolShape sh, const float* __restrict__ sbar, const float* __restrict__ lse,
                         const float* __restrict__ dsbar, int R, int64_t tiles, void* __restrict__ df, bool df_f32,
                         float* __restrict__ partial) {
  __shared__ __align__(128) float kvs[kMaxTileRows * kLd];
  __shared__ __align__(128) float ks[kHp * kLd];
  __shared__ __align__(128) float ds[kHp * kLd];
  __shared__ __align__(128) float part[kWarps][256];   // a warp's 16 x 16 products
  __shared__ __align__(128) float part2[kWarps][256];
  __shared__ __align__(128) float aw[kMaxTileRows * kHp];   // a (row r, head h at r * kHp + h)
  __shared__ __align__(128) float cw[kMaxTileRows * kHp];   // c
  __shared__ float delta[kHp];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t D = sh.D, H = sh.H, hd = H * D, l0 = tile * R;
  const int rows = static_cast<int>(sh.L - l0 < R ? sh.L - l0 : R);
  const T* fimg = f + sb * sh.L * D;
  const float* K = kt + s * hd;
  const float* DS = dsbar + sb * hd;
  const int G = R / 16, grp = warp % G, ksplit = kWarps / G;
  for (int64_t h = warp; h < H; h += kWarps) {   // delta_h = sbar_h . dsbar_h
    const float* x = sbar + sb * hd + h * D;
    const float* y = DS + h * D;
    float dot = 0.0f;
    for (int64_t c = lane; c < D; c += 32) dot = fmaf(x[c], y[c], dot);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) delta[h] = dot;
  }
  // pass 1: kv kt^T and kv dsbar^T
  Acc acc_k, acc_d;
  wm::fill_fragment(acc_k, 0.0f);
  wm::fill_fragment(acc_d, 0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    stage_kv<T, V>(fimg, pos, l0, rows, R, d0, D, kvs);
    stage_heads(K, ks, DS, ds, H, d0, D);
    __syncthreads();
    for (int k = warp / G; k < kSlice / 8; k += ksplit) {
      Operand<kSplit, RowA> a;
      Operand<kSplit, ColB> b;
      a.load(kvs + grp * 16 * kLd + k * 8, kLd);
      b.load(ks + k * 8, kLd);
      mma(acc_k, a, b);
      b.load(ds + k * 8, kLd);
      mma(acc_d, a, b);
    }
    __syncthreads();
  }
  wm::store_matrix_sync(part[warp], acc_k, 16, wm::mem_row_major);
  wm::store_matrix_sync(part2[warp], acc_d, 16, wm::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < R * kHp; i += kThreads) {
    const int r = i / kHp, h = i % kHp;
    float a = 0.0f, c = 0.0f;
    if (r < rows && h < H) {
      a = expf(group_total(part, r, h, G) * scale - lse[sb * H + h]);
      c = a * (group_total(part2, r, h, G) - delta[h]) * scale;
    }
    aw[i] = a;
    cw[i] = c;
  }
  // pass 2, per slice: the key gradient (16 columns a warp), then df (16 x 16 tiles, in turn)
  float* key_out = partial + (sb * tiles + tile) * hd;
  const int64_t out_row = sb * sh.L + l0;
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    __syncthreads();                             // aw, cw written; the previous slice's reads done
    stage_kv<T, V>(fimg, pos, l0, rows, R, d0, D, kvs);
    stage_heads(K, ks, DS, ds, H, d0, D);
    __syncthreads();
    Acc o;
    wm::fill_fragment(o, 0.0f);
    for (int k = 0; k < R / 8; ++k) {
      Operand<kSplit, ColA> a;
      Operand<kSplit, RowB> b;
      a.load(cw + k * 8 * kHp, kHp);             // c^T: (h, r) at cw[r * kHp + h]
      b.load(kvs + k * 8 * kLd + warp * 16, kLd);
      mma(o, a, b);
    }
    wm::store_matrix_sync(part[warp], o, 16, wm::mem_row_major);
    __syncwarp();
    write_heads(part[warp], H, key_out, d0 + warp * 16, D, lane);
    for (int t = warp; t < G * (kSlice / 16); t += kWarps) {
      const int rg = t / (kSlice / 16), cg = t % (kSlice / 16);
      if (rg * 16 >= rows) continue;
      wm::fill_fragment(o, 0.0f);
#pragma unroll
      for (int k = 0; k < kHp / 8; ++k) {
        Operand<kSplit, RowA> a;
        Operand<kSplit, RowB> b;
        a.load(aw + rg * 16 * kHp + k * 8, kHp);
        b.load(ds + k * 8 * kLd + cg * 16, kLd);
        mma(o, a, b);
        a.load(cw + rg * 16 * kHp + k * 8, kHp);
        b.load(ks + k * 8 * kLd + cg * 16, kLd);
        mma(o, a, b);
      }
      __syncwarp();                              // the scratch's previous reads done
      wm::store_matrix_sync(part2[warp], o, 16, wm::mem_row_major);
      __syncwarp();
      for (int i = lane; i < 256; i += 32) {
        const int r = rg * 16 + i / 16;
        const int64_t d = d0 + cg * 16 + i % 16;
        if (r < rows && d < D) {
          const int64_t at = (out_row + r) * D + d;
          if (df_f32) {
            static_cast<float*>(df)[at] = part2[warp][i];
          } else {
            static_cast<T*>(df)[at] = from_f32<T>(part2[warp][i]);
          }
        }
      }
    }
  }
}

bool shape_ok(const PoolShape& sh) {
  return sh.S > 0 && sh.B > 0 && sh.L > 0 && sh.D > 0 && sh.H > 0 && sh.H <= kPoolMaxHeads;
}

// 3xTF32 products for fp32 f (its own precision); for 16-bit f, APM_FAST_POOL_SPLIT=0 gives
// 1xTF32 (kv, the keys and the weights with 10 mantissa bits, more than a 16-bit f carries).
template <typename T>
bool split_products() {
  if (std::is_same<T, float>::value) return true;
  const char* v = std::getenv("APM_FAST_POOL_SPLIT");
  return !(v && v[0] == '0');
}

// fn(V, split) as std::integral_constants: V elements per load (16 bytes when D is a multiple of
// that and both row arrays are 16-byte aligned, else 1), split as split_products says.
template <typename T, typename Fn>
void with_layout(const PoolShape& sh, const void* f, const void* pos, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = sh.D % kVec == 0 && reinterpret_cast<uintptr_t>(f) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(pos) % 16 == 0;
  auto prec = [&](auto v) {
    if (split_products<T>()) {
      fn(v, std::true_type{});
    } else if constexpr (!std::is_same<T, float>::value) {
      fn(v, std::false_type{});
    }
  };
  if (vec) {
    prec(std::integral_constant<int, kVec>{});
  } else {
    prec(std::integral_constant<int, 1>{});
  }
}

bool tile_grid(PoolShape sh, int tile_rows, int64_t* tiles, int64_t* blocks);

}  // namespace

int pool_tile_rows(PoolShape sh, int sm_count) {
  // the most rows (64, 32) that still give two waves of blocks; 16 (a product's height) else
  const int64_t images = sh.S * sh.B, want = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 132);
  for (int rows = kMaxTileRows; rows > 16; rows /= 2)
    if (images * ceil_div(sh.L, rows) >= want) return rows;
  return 16;
}

int64_t pool_tiles(PoolShape sh, int tile_rows) { return ceil_div(sh.L, tile_rows); }

namespace {
bool tile_grid(PoolShape sh, int tile_rows, int64_t* tiles, int64_t* blocks) {
  if (!shape_ok(sh) || (tile_rows != 16 && tile_rows != 32 && tile_rows != 64)) return false;
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
  cudaError_t e = APM_DISPATCH_DTYPE(t, T, [&] {
    with_layout<T>(sh, f, pos, [&](auto v, auto split) {
      pool_fwd_tile_kernel<T, decltype(v)::value, decltype(split)::value>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, tile_rows, tiles, part_m,
              part_s, part_acc);
    });
    return launch_status();
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
  if (df_t != t && df_t != DType::kFloat32) return cudaErrorInvalidValue;
  cudaError_t e = APM_DISPATCH_DTYPE(t, T, [&] {
    with_layout<T>(sh, f, pos, [&](auto v, auto split) {
      pool_bwd_tile_kernel<T, decltype(v)::value, decltype(split)::value>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              static_cast<const T*>(f), static_cast<const T*>(pos), kt, scale, sh, sbar, lse, dsbar, tile_rows,
              tiles, df, df_t == DType::kFloat32, partial);
    });
    return launch_status();
  });
  if (e != cudaSuccess) return e;
  // dkt[s] = sum over the B * tiles partials of student s (H*D columns)
  return colsum(partial, DType::kFloat32, sh.S, sh.B * tiles, sh.H * sh.D, dkt, sh.H * sh.D, nullptr, 1,
                1.0f, stream);
}

}  // namespace apm
