// The pool's tile kernels for tiles of 64 rows of a 16-bit f (many images: pool_tile_rows gives
// 64 when the images fill two waves of blocks), every head at once on the tensor cores; pool.cu
// launches them in place of its row-per-warp tile kernels there and merges their partials the
// same way (same layouts: part_m, part_s (S*B, tiles, H), part_acc and the key gradient's
// partial (S*B, tiles, H, D)).
//
// A block of 4 warps takes 64 rows of one image and the heads padded to 16; D is walked in slices
// of 64 columns, each slice of kv = f + pos_out (added in fp32) and of the (heads x D) operands
// staged in shared memory, the next slice's loads issued into registers before the current
// slice's products (one slice of f and pos in flight while the tensor cores work):
//   forward   pass 1   scores (64 x 16) = kv kt^T, warp w the rows 16w..16w+15
//             softmax  the tile's max, weights and sum per head
//             pass 2   the weighted sums (16 x D) = weights^T kv, warp w 16 columns of a slice
//   backward  pass 1   kv kt^T and kv dsbar^T; then a and c = scale a (kv . dsbar - sbar . dsbar)
//             pass 2   per slice, the key gradient c^T kv and df = a dsbar + c kt
// The products are tf32 mma (nvcuda::wmma m16n16k8), as the Triton pool's for 16-bit f: kv, the
// keys and the softmax weights enter them with 10 mantissa bits, more than f carries.
#include <mma.h>

#include <cstdlib>   // EXPERIMENT ONLY

#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

namespace wm = nvcuda::wmma;

constexpr int kRows = 64;                        // rows per tile
constexpr int kWarps = kRows / 16;               // a warp per 16 rows
constexpr int kThreads = kWarps * 32;
constexpr int kHp = 16;                          // heads, padded to a product's width
constexpr int kSlice = 64;                       // columns of D per slice
constexpr int kLd = kSlice + 4;                  // row stride of a staged slice (floats; 16-byte multiple)
constexpr int kVec = 8;                          // 16-bit elements per 16-byte load
constexpr int kPacks = kRows * kSlice / kVec / kThreads;   // a thread's loads of a slice, per array
constexpr int kHeadVals = kHp * kSlice / kThreads;         // a thread's values of a heads slice
static_assert(kPoolMaxHeads <= kHp, "the heads are padded to kHp");

using Acc = wm::fragment<wm::accumulator, 16, 16, 8, float>;
using RowA = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::row_major>;
using ColA = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::col_major>;
using RowB = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::row_major>;
using ColB = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::col_major>;

template <typename Frag>
__device__ __forceinline__ void load_tf32(Frag& x, const float* p, unsigned ld) {
  wm::load_matrix_sync(x, p, ld);
#pragma unroll
  for (int i = 0; i < x.num_elements; ++i) x.x[i] = wm::__float_to_tf32(x.x[i]);
}

// acc += a b, the operands from shared memory
template <typename FA, typename FB>
__device__ __forceinline__ void mma(Acc& acc, const float* a, unsigned lda, const float* b, unsigned ldb) {
  FA fa;
  FB fb;
  load_tf32(fa, a, lda);
  load_tf32(fb, b, ldb);
  wm::mma_sync(acc, fa, fb, acc);
}

// A thread's share of a 64 x kSlice slice of f and pos_out (16 bytes a load), held in registers
// between its loads and its store (as kv = f + pos in fp32) to shared memory.
template <typename T>
struct KvSlice {
  struct alignas(16) Pack {
    T x[kVec];
  };
  Pack f[kPacks], p[kPacks];
  __device__ __forceinline__ void load(const T* __restrict__ fimg, const T* __restrict__ pos, int64_t l0, int rows,
                                       int64_t d0, int64_t D) {
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      const int i = threadIdx.x + u * kThreads, r = i / (kSlice / kVec);
      const int64_t d = d0 + (i % (kSlice / kVec)) * kVec;
      if (r < rows && d < D) {                   // D % kVec == 0: a vector is wholly in range
        f[u] = *reinterpret_cast<const Pack*>(fimg + (l0 + r) * D + d);
        p[u] = *reinterpret_cast<const Pack*>(pos + (l0 + r) * D + d);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) f[u].x[e] = p[u].x[e] = from_f32<T>(0.0f);
      }
    }
  }
  __device__ __forceinline__ void store(float* __restrict__ kvs) const {
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      const int i = threadIdx.x + u * kThreads, r = i / (kSlice / kVec), c = (i % (kSlice / kVec)) * kVec;
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        float4 v;
        v.x = to_f32<T>(f[u].x[e]) + to_f32<T>(p[u].x[e]);
        v.y = to_f32<T>(f[u].x[e + 1]) + to_f32<T>(p[u].x[e + 1]);
        v.z = to_f32<T>(f[u].x[e + 2]) + to_f32<T>(p[u].x[e + 2]);
        v.w = to_f32<T>(f[u].x[e + 3]) + to_f32<T>(p[u].x[e + 3]);
        *reinterpret_cast<float4*>(kvs + r * kLd + c + e) = v;
      }
    }
  }
};

// A thread's share of a kHp x kSlice slice of an (H, D) fp32 matrix (0 past H and D).
struct HeadSlice {
  float x[kHeadVals];
  __device__ __forceinline__ void load(const float* __restrict__ M, int64_t H, int64_t d0, int64_t D) {
#pragma unroll
    for (int u = 0; u < kHeadVals; ++u) {
      const int i = threadIdx.x + u * kThreads, h = i / kSlice;
      const int64_t d = d0 + i % kSlice;
      x[u] = h < H && d < D ? M[h * D + d] : 0.0f;
    }
  }
  __device__ __forceinline__ void store(float* __restrict__ dst) const {
#pragma unroll
    for (int u = 0; u < kHeadVals; ++u) {
      const int i = threadIdx.x + u * kThreads;
      dst[(i / kSlice) * kLd + i % kSlice] = x[u];
    }
  }
};

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

// rows h < nh of a warp's 16 x 16 tile (row-major in shared memory) to dst[h * D + d0 + c], c < 16, in D
__device__ __forceinline__ void write_heads(const float* __restrict__ tile, int64_t nh, float* __restrict__ dst,
                                            int64_t d0, int64_t D, int lane) {
  for (int i = lane; i < nh * 16; i += 32) {
    const int64_t h = i / 16, d = d0 + i % 16;
    if (d < D) dst[h * D + d] = tile[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    pool_fwd_mma_kernel(const T* __restrict__ f, const T* __restrict__ pos, const float* __restrict__ kt,
                        float scale, PoolShape sh, int64_t tiles, float* __restrict__ part_m,
                        float* __restrict__ part_s, float* __restrict__ part_acc) {
  __shared__ __align__(128) float kvs[kRows * kLd];
  __shared__ __align__(128) float ks[kHp * kLd];
  __shared__ __align__(128) float tile16[kWarps][256];   // a warp's 16 x 16 products
  __shared__ __align__(128) float w[kRows * kHp];        // scores, then weights (row r, head h at r * kHp + h)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t D = sh.D, H = sh.H, l0 = tile * kRows;
  const int rows = static_cast<int>(sh.L - l0 < kRows ? sh.L - l0 : kRows);
  const T* fimg = f + sb * sh.L * D;
  const float* K = kt + s * H * D;
  KvSlice<T> kv;
  HeadSlice hk;
  // pass 1: the scores of the warp's 16 rows
  Acc acc;
  wm::fill_fragment(acc, 0.0f);
  kv.load(fimg, pos, l0, rows, 0, D);
  hk.load(K, H, 0, D);
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    kv.store(kvs);
    hk.store(ks);
    __syncthreads();
    if (d0 + kSlice < D) {                       // the next slice's loads, in flight during the products
      kv.load(fimg, pos, l0, rows, d0 + kSlice, D);
      hk.load(K, H, d0 + kSlice, D);
    }
#pragma unroll 2
    for (int k = 0; k < kSlice / 8; ++k)
      mma<RowA, ColB>(acc, kvs + warp * 16 * kLd + k * 8, kLd, ks + k * 8, kLd);   // kt^T: (k, h) at ks[h kLd + k]
    __syncthreads();
  }
  kv.load(fimg, pos, l0, rows, 0, D);            // pass 2's first slice, in flight during the softmax
  wm::store_matrix_sync(w + warp * 16 * kHp, acc, kHp, wm::mem_row_major);
  __syncthreads();
  {                                              // softmax per head (log2 domain): 8 threads a head
    const float scale2 = scale * 1.4426950408889634f;
    const int h = threadIdx.x / 8, j = threadIdx.x % 8;
    float m = -INFINITY;
    for (int r = j; r < rows; r += 8) m = fmaxf(m, w[r * kHp + h] * scale2);
    m = max8(m);
    float sum = 0.0f;
    for (int r = j; r < kRows; r += 8) {
      const float e = h < H && r < rows ? exp2f(w[r * kHp + h] * scale2 - m) : 0.0f;
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
  // pass 2: the weighted sums, 16 columns of each slice a warp
  float* acc_out = part_acc + (sb * tiles + tile) * H * D;
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    __syncthreads();                             // w written; the previous slice's reads done
    kv.store(kvs);
    __syncthreads();
    if (d0 + kSlice < D) kv.load(fimg, pos, l0, rows, d0 + kSlice, D);
    Acc o;
    wm::fill_fragment(o, 0.0f);
#pragma unroll 2
    for (int k = 0; k < kRows / 8; ++k)          // weights^T: (h, r) at w[r kHp + h]
      mma<ColA, RowB>(o, w + k * 8 * kHp, kHp, kvs + k * 8 * kLd + warp * 16, kLd);
    wm::store_matrix_sync(tile16[warp], o, 16, wm::mem_row_major);
    __syncwarp();
    write_heads(tile16[warp], H, acc_out, d0 + warp * 16, D, lane);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 3)
    pool_bwd_mma_kernel(const T* __restrict__ f, const T* __restrict__ pos, const float* __restrict__ kt,
                        float scale, PoolShape sh, const float* __restrict__ sbar, const float* __restrict__ lse,
                        const float* __restrict__ dsbar, int64_t tiles, void* __restrict__ df, bool df_f32,
                        float* __restrict__ partial) {
  __shared__ __align__(128) float kvs[kRows * kLd];
  __shared__ __align__(128) float ks[kHp * kLd];
  __shared__ __align__(128) float ds[kHp * kLd];
  __shared__ __align__(128) float tile16[kWarps][256];   // a warp's 16 x 16 products
  __shared__ __align__(128) float aw[kRows * kHp];       // kv kt^T, then a (row r, head h at r * kHp + h)
  __shared__ __align__(128) float cw[kRows * kHp];       // kv dsbar^T, then c
  __shared__ float delta[kHp];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x % tiles, sb = blockIdx.x / tiles, s = sb / sh.B;
  const int64_t D = sh.D, H = sh.H, hd = H * D, l0 = tile * kRows;
  const int rows = static_cast<int>(sh.L - l0 < kRows ? sh.L - l0 : kRows);
  const T* fimg = f + sb * sh.L * D;
  const float* K = kt + s * hd;
  const float* DS = dsbar + sb * hd;
  KvSlice<T> kv;
  HeadSlice hk, hd_;
  kv.load(fimg, pos, l0, rows, 0, D);
  hk.load(K, H, 0, D);
  hd_.load(DS, H, 0, D);
  for (int64_t h = warp; h < H; h += kWarps) {   // delta_h = sbar_h . dsbar_h
    const float* x = sbar + sb * hd + h * D;
    const float* y = DS + h * D;
    float dot = 0.0f;
    for (int64_t c = lane; c < D; c += 32) dot = fmaf(x[c], y[c], dot);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) delta[h] = dot;
  }
  // pass 1: kv kt^T and kv dsbar^T of the warp's 16 rows
  Acc acc_k, acc_d;
  wm::fill_fragment(acc_k, 0.0f);
  wm::fill_fragment(acc_d, 0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    kv.store(kvs);
    hk.store(ks);
    hd_.store(ds);
    __syncthreads();
    if (d0 + kSlice < D) {
      kv.load(fimg, pos, l0, rows, d0 + kSlice, D);
      hk.load(K, H, d0 + kSlice, D);
      hd_.load(DS, H, d0 + kSlice, D);
    }
#pragma unroll 2
    for (int k = 0; k < kSlice / 8; ++k) {
      RowA a;
      ColB b;
      load_tf32(a, kvs + warp * 16 * kLd + k * 8, kLd);
      load_tf32(b, ks + k * 8, kLd);
      wm::mma_sync(acc_k, a, b, acc_k);
      load_tf32(b, ds + k * 8, kLd);
      wm::mma_sync(acc_d, a, b, acc_d);
    }
    __syncthreads();
  }
  kv.load(fimg, pos, l0, rows, 0, D);            // pass 2's first slices, in flight meanwhile
  hk.load(K, H, 0, D);
  hd_.load(DS, H, 0, D);
  wm::store_matrix_sync(aw + warp * 16 * kHp, acc_k, kHp, wm::mem_row_major);
  wm::store_matrix_sync(cw + warp * 16 * kHp, acc_d, kHp, wm::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * kHp; i += kThreads) {
    const int r = i / kHp, h = i % kHp;
    float a = 0.0f, c = 0.0f;
    if (r < rows && h < H) {
      a = expf(aw[i] * scale - lse[sb * H + h]);
      c = a * (cw[i] - delta[h]) * scale;
    }
    aw[i] = a;
    cw[i] = c;
  }
  // pass 2, per slice: the key gradient (16 columns a warp), then df (a warp's 16 rows)
  float* key_out = partial + (sb * tiles + tile) * hd;
  const int64_t out_row = sb * sh.L + l0 + warp * 16;
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    __syncthreads();                             // a, c written; the previous slice's reads done
    kv.store(kvs);
    hk.store(ks);
    hd_.store(ds);
    __syncthreads();
    if (d0 + kSlice < D) {
      kv.load(fimg, pos, l0, rows, d0 + kSlice, D);
      hk.load(K, H, d0 + kSlice, D);
      hd_.load(DS, H, d0 + kSlice, D);
    }
    Acc o;
    wm::fill_fragment(o, 0.0f);
#pragma unroll 2
    for (int k = 0; k < kRows / 8; ++k)          // c^T: (h, r) at cw[r kHp + h]
      mma<ColA, RowB>(o, cw + k * 8 * kHp, kHp, kvs + k * 8 * kLd + warp * 16, kLd);
    wm::store_matrix_sync(tile16[warp], o, 16, wm::mem_row_major);
    __syncwarp();
    write_heads(tile16[warp], H, key_out, d0 + warp * 16, D, lane);
    if (warp * 16 >= rows) continue;             // the warp's rows are past L (no barrier below)
#pragma unroll 1
    for (int cg = 0; cg < kSlice / 16; ++cg) {   // df of the warp's 16 rows, 16 columns at a time
      wm::fill_fragment(o, 0.0f);
#pragma unroll
      for (int k = 0; k < kHp / 8; ++k) {
        mma<RowA, RowB>(o, aw + warp * 16 * kHp + k * 8, kHp, ds + k * 8 * kLd + cg * 16, kLd);
        mma<RowA, RowB>(o, cw + warp * 16 * kHp + k * 8, kHp, ks + k * 8 * kLd + cg * 16, kLd);
      }
      __syncwarp();                              // the scratch's previous reads done
      wm::store_matrix_sync(tile16[warp], o, 16, wm::mem_row_major);
      __syncwarp();
      const int r = lane / 2, c = (lane % 2) * 8;   // a lane: 8 adjacent columns of one row
      const int64_t d = d0 + cg * 16 + c;
      if (warp * 16 + r < rows && d < D) {       // D % 8 == 0: the 8 columns are in range
        const float* src = tile16[warp] + r * 16 + c;
        const int64_t at = (out_row + r) * D + d;
        if (df_f32) {
          float4* dst = reinterpret_cast<float4*>(static_cast<float*>(df) + at);
          dst[0] = make_float4(src[0], src[1], src[2], src[3]);
          dst[1] = make_float4(src[4], src[5], src[6], src[7]);
        } else {
          typename KvSlice<T>::Pack out;
#pragma unroll
          for (int e = 0; e < kVec; ++e) out.x[e] = from_f32<T>(src[e]);
          *reinterpret_cast<typename KvSlice<T>::Pack*>(static_cast<T*>(df) + at) = out;
        }
      }
    }
  }
}

}  // namespace

bool pool_mma_ok(PoolShape sh, DType t, int tile_rows, const void* f, const void* pos, const void* df) {
  if (const char* v = std::getenv("APM_FAST_POOL_MMA")) if (v[0] == '0') return false;   // EXPERIMENT ONLY
  return tile_rows == kRows && t != DType::kFloat32 && sh.D % kVec == 0 &&
         reinterpret_cast<uintptr_t>(f) % 16 == 0 && reinterpret_cast<uintptr_t>(pos) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(df) % 16 == 0;
}

cudaError_t pool_fwd_tiles_mma(const void* f, const void* pos, DType t, const float* kt, float scale, PoolShape sh,
                               int64_t tiles, float* part_m, float* part_s, float* part_acc, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(sh.S * sh.B * tiles);
  if (t == DType::kBFloat16) {
    pool_fwd_mma_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(f), static_cast<const __nv_bfloat16*>(pos), kt, scale, sh, tiles, part_m,
        part_s, part_acc);
  } else if (t == DType::kFloat16) {
    pool_fwd_mma_kernel<__half><<<blocks, kThreads, 0, stream>>>(
        static_cast<const __half*>(f), static_cast<const __half*>(pos), kt, scale, sh, tiles, part_m, part_s,
        part_acc);
  } else {
    return cudaErrorInvalidValue;
  }
  return launch_status();
}

cudaError_t pool_bwd_tiles_mma(const void* f, const void* pos, DType t, const float* kt, float scale, PoolShape sh,
                               const float* sbar, const float* lse, const float* dsbar, int64_t tiles, void* df,
                               bool df_f32, float* partial, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(sh.S * sh.B * tiles);
  if (t == DType::kBFloat16) {
    pool_bwd_mma_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(f), static_cast<const __nv_bfloat16*>(pos), kt, scale, sh, sbar, lse,
        dsbar, tiles, df, df_f32, partial);
  } else if (t == DType::kFloat16) {
    pool_bwd_mma_kernel<__half><<<blocks, kThreads, 0, stream>>>(
        static_cast<const __half*>(f), static_cast<const __half*>(pos), kt, scale, sh, sbar, lse, dsbar, tiles, df,
        df_f32, partial);
  } else {
    return cudaErrorInvalidValue;
  }
  return launch_status();
}

}  // namespace apm
