// Adam (no weight decay) over the flat fp32 parameter buffer: one launch updates every tensor of
// every student (the buffer is what apex's multi-tensor apply builds from a tensor list; here the
// trainer keeps the parameters as views of one buffer, so one flat pass does it).
//
// Capturable: the update number and the learning rate are read from device memory at run time,
// so a CUDA graph that captured this launch stays right as the caller increments `step`.
// Bias corrections follow torch.optim.Adam: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
//
// Memory bound (30 B per parameter with fp32 moments, 22 B with bf16 ones): four elements per
// thread and iteration through 16-byte loads and stores (8-byte for the 16-bit moments and copy)
// where every buffer is aligned for them, element by element otherwise. The moments are fp32 or
// bf16: read into fp32, updated there, rounded once when stored.
//
// The buffers are rows of `cols` contiguous elements with a row stride each (a flat buffer is
// one row, or one per student; a block of a weight's columns is one row per student and weight
// row). The gradient is read, or built from its factors (a rank-K weight gradient: the first
// layer's trigger columns, sum_k a_k b_k^T, and the position columns' two blocks with the code's
// halves) and never stored: 26 B per parameter instead of 30 plus the 4 B its own kernel would
// have written.
//
// At update 1 the moments are taken as zeros, whatever the buffers hold (the engine's reset
// leaves them as the last batch left them): the same update bit for bit as from zeroed buffers.
// The loaded values are then dead, and nvcc splits the row kernel's loops in two on the step and
// drops the moments' loads from the step-1 copy (sm_90a SASS: two 16-byte loads an iteration
// there, p and g, against four), so that step reads 8 B (4 with bf16 moments) a parameter less;
// the tiles kernel still loads them (its update is not split: one step in 20, rank >= 16 only).
//
// The reset (`broadcast`): S students' weights, and their compute copy, set to one snapshot;
// each block reads its slice of the snapshot once and stores it into every student's rows, with
// streaming (evict-first) stores: with plain stores, the fp32 weights and their bf16 copy stored
// together ran at 1.6-1.7 TB/s on the H200 (1.9 ms for 64 students of an 8.4 M-element weight,
// 3.2 GB); streaming, 4.0 TB/s (0.81 ms), as the Triton kernel's (the weights alone ran at
// 2.7-3.1 TB/s either way). Measured in one run against variants; the cause not profiled.
#include "apm_kernels.h"
#include "dtype_util.cuh"

namespace apm {

namespace {

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T x[4];
};

struct AdamCoef {
  float b1, b2, omb1, omb2, eps, step_size, bc2_sqrt;
  bool fresh;   // update 1: the moments taken as zeros
};

// The update's division and square root are PTX's div.full.f32 (2 ulp) and sqrt.approx.ftz.f32,
// what the Triton table's `/` and tl.sqrt compile to, not the IEEE ones: IEEE division is a
// dozen instructions with a slow-path call (a stack frame in every update kernel), and the update
// is instruction bound enough that it shows. One A/B on the H200 (ttt-l14; section "ea13caa" of
// benchmarks/results/h200/README.md): the one-image step 0.476 against 0.494 ms, 64 students
// side by side 137.1 against 130.0 images/s (bf16 moments 150.9 against 137.1). Three updates
// against float64 torch.optim.Adam: the same largest error as the IEEE kernel's (6.1e-7); 2 ulp
// of an update of size ~lr is far below the fp32 rounding of the parameter it is added to.
__device__ __forceinline__ float div_full(float a, float b) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float sqrt_approx(float a) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

__device__ __forceinline__ void adam_one(const AdamCoef& c, float g, float& p, float& m, float& v) {
  m = fmaf(c.b1, m, c.omb1 * g);
  v = fmaf(c.b2, v, c.omb2 * g * g);
  // torch.optim.Adam's order: denom = sqrt(v) / sqrt(1 - b2^t) + eps; p -= step_size * (m / denom)
  p = p - c.step_size * div_full(m, div_full(sqrt_approx(v), c.bc2_sqrt) + c.eps);
}

// The update's coefficients, the bias corrections in double (as torch computes them on the host):
// 1 - beta^t by binary powering (t is the update number, an integer; log2(t) + 1 rounds, a few
// ulp of double). Every thread computes them: no shared copy, no barrier before a block's first
// loads (one thread's two double pow() and a __syncthreads held every block up: with them, the
// one-image step's Adam took 183 us against 176: benchmarks/results/h200/README.md, section
// "4074410").
__device__ __forceinline__ AdamCoef coefficients(const float* step, const float* lr, double beta1, double beta2,
                                                 float omb1, float omb2, float eps) {
  unsigned n = static_cast<unsigned>(*step);
  double r1 = 1.0, r2 = 1.0, b1 = beta1, b2 = beta2;
  for (; n != 0; n >>= 1) {
    if (n & 1u) {
      r1 *= b1;
      r2 *= b2;
    }
    b1 *= b1;
    b2 *= b2;
  }
  return AdamCoef{static_cast<float>(beta1), static_cast<float>(beta2), omb1, omb2, eps,
                  static_cast<float>(static_cast<double>(*lr) / (1.0 - r1)), static_cast<float>(sqrt(1.0 - r2)),
                  static_cast<unsigned>(*step) == 1u};
}

constexpr int kThreads = 256;
constexpr int kTile = 4 * kThreads;   // elements of one row a block updates per iteration
constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

// One buffer of the update seen as rows of `cols` contiguous elements, `ld` apart.
template <typename T>
struct Rows {
  T* ptr;
  int64_t ld;
  __device__ __forceinline__ T* at(int64_t row, int64_t col) const { return ptr + row * ld + col; }
};

// The gradient of element (row, col): read from `g`, or (OUTER) built from its factors,
// sum_k a[s, k, i] b[s, k, col] with row = s * rows_per_student + i.
struct GradSrc {
  Rows<const float> g;
  const float* a;
  const float* b;
  int64_t a_s, a_k, b_s, b_k, rows_per_student;
  int k;
};

template <bool OUTER>
__device__ __forceinline__ void grad4(const GradSrc& src, int64_t row, int64_t col, int count, float gf[4]) {
  if (!OUTER) {
    if (count == 4) {
      const float4 gv = *reinterpret_cast<const float4*>(src.g.at(row, col));
      gf[0] = gv.x; gf[1] = gv.y; gf[2] = gv.z; gf[3] = gv.w;
    } else {
      for (int e = 0; e < count; ++e) gf[e] = *src.g.at(row, col + e);
    }
    return;
  }
  // rows < 2^31 (the launcher checks): a 32-bit division, not the 64-bit one's ~100 instructions
  const int64_t s = static_cast<uint32_t>(row) / static_cast<uint32_t>(src.rows_per_student);
  const int64_t i = row - s * src.rows_per_student;
#pragma unroll
  for (int e = 0; e < 4; ++e) gf[e] = 0.0f;
  for (int k = 0; k < src.k; ++k) {
    const float a = src.a[s * src.a_s + k * src.a_k + i];
    const float* b = src.b + s * src.b_s + k * src.b_k + col;
    if (count == 4) {
      const float4 bv = *reinterpret_cast<const float4*>(b);
      gf[0] = fmaf(a, bv.x, gf[0]); gf[1] = fmaf(a, bv.y, gf[1]);
      gf[2] = fmaf(a, bv.z, gf[2]); gf[3] = fmaf(a, bv.w, gf[3]);
    } else {
      for (int e = 0; e < count; ++e) gf[e] = fmaf(a, b[e], gf[e]);
    }
  }
}

// Elements (row, col .. col + 3) from their gradients gf through 16-byte loads and stores (8-byte
// for the 16-bit moments and copy).
template <typename TM, typename TL>
__device__ __forceinline__ void update4(const AdamCoef& c, const float gf[4], const Rows<float>& p, const Rows<TM>& m,
                                        const Rows<TM>& v, const Rows<TL>& lowp, int64_t row, int64_t col) {
  float4 pv = *reinterpret_cast<float4*>(p.at(row, col));
  Vec4<TM> mv = *reinterpret_cast<Vec4<TM>*>(m.at(row, col));
  Vec4<TM> vv = *reinterpret_cast<Vec4<TM>*>(v.at(row, col));
  if (c.fresh) {
    mv.x[0] = mv.x[1] = mv.x[2] = mv.x[3] = from_f32<TM>(0.0f);
    vv = mv;
  }
  float pf[4] = {pv.x, pv.y, pv.z, pv.w};
  Vec4<TL> lv;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float mk = to_f32<TM>(mv.x[k]), vk = to_f32<TM>(vv.x[k]);
    adam_one(c, gf[k], pf[k], mk, vk);
    mv.x[k] = from_f32<TM>(mk);
    vv.x[k] = from_f32<TM>(vk);
    lv.x[k] = from_f32<TL>(pf[k]);
  }
  *reinterpret_cast<float4*>(p.at(row, col)) = make_float4(pf[0], pf[1], pf[2], pf[3]);
  *reinterpret_cast<Vec4<TM>*>(m.at(row, col)) = mv;
  *reinterpret_cast<Vec4<TM>*>(v.at(row, col)) = vv;
  if (lowp.ptr != nullptr) *reinterpret_cast<Vec4<TL>*>(lowp.at(row, col)) = lv;
}

// One element, read and written alone (unaligned buffers, a row's last elements).
template <typename TM, typename TL>
__device__ __forceinline__ void update1(const AdamCoef& c, float g, const Rows<float>& p, const Rows<TM>& m,
                                        const Rows<TM>& v, const Rows<TL>& lowp, int64_t row, int64_t col) {
  float pi = *p.at(row, col), mi = to_f32<TM>(*m.at(row, col)), vi = to_f32<TM>(*v.at(row, col));
  if (c.fresh) mi = vi = 0.0f;
  adam_one(c, g, pi, mi, vi);
  *m.at(row, col) = from_f32<TM>(mi);
  *v.at(row, col) = from_f32<TM>(vi);
  *p.at(row, col) = pi;
  if (lowp.ptr != nullptr) *lowp.at(row, col) = from_f32<TL>(pi);
}

// Every (row, tile of kTile columns) once (grid-striding when there are more tiles than blocks);
// a thread updates 4 consecutive elements through 16-byte loads and stores (8-byte for the 16-bit
// moments and copy) when `vec` (every buffer's rows aligned for them), element by element otherwise.
// The minimum blocks an SM keep the occupancy the kernels had before the step-1 case (5 and 6
// blocks of 256 threads: 48 registers reading the factors, 40 otherwise, no spills); without them
// nvcc's split loops took the one reading the factors to 56-62 registers (4 blocks).
template <typename TM, typename TL, bool OUTER>
__global__ void __launch_bounds__(kThreads, OUTER ? 5 : 6)
    adam_kernel(Rows<float> p, GradSrc g, Rows<TM> m, Rows<TM> v, Rows<TL> lowp, int64_t rows, int64_t cols,
                const float* __restrict__ step, const float* __restrict__ lr, double beta1,
                double beta2, float omb1, float omb2, float eps, bool vec, bool packed) {
  const AdamCoef c = coefficients(step, lr, beta1, beta2, omb1, omb2, eps);
  if (packed) {
    // Rows narrower than a tile (a block of a weight's columns: 768 of the first layer's 1536 for
    // ttt-l14), each a multiple of 4 elements and aligned (vec): tiles of the rows laid end to
    // end, so that no thread idles past a row's end (one tile a row left a quarter of them idle
    // and ran these blocks at half the copy rate). Fewer than 2^31 elements: 32-bit divisions.
    const int64_t total = rows * cols;
    for (int64_t t = blockIdx.x; t * kTile < total; t += gridDim.x) {
      const int64_t e = t * kTile + 4 * static_cast<int64_t>(threadIdx.x);
      if (e >= total) continue;
      const int64_t row = static_cast<uint32_t>(e) / static_cast<uint32_t>(cols), col = e - row * cols;
      float gf[4];
      grad4<OUTER>(g, row, col, 4, gf);
      update4<TM, TL>(c, gf, p, m, v, lowp, row, col);
    }
    return;
  }
  // tile = row * tiles_per_row + column tile, advanced by gridDim.x tiles an iteration without
  // a division (the update is instruction bound enough that a 64-bit one a tile shows)
  const int64_t tiles_per_row = ceil_div(cols, kTile);
  const int64_t rows_step = gridDim.x / tiles_per_row, tiles_step = gridDim.x - rows_step * tiles_per_row;
  int64_t row = blockIdx.x / tiles_per_row, col_tile = blockIdx.x - row * tiles_per_row;
  for (; row < rows; row += rows_step, col_tile += tiles_step) {
    if (col_tile >= tiles_per_row) {
      col_tile -= tiles_per_row;
      if (++row >= rows) break;
    }
    const int64_t base = col_tile * kTile;
    auto scalar = [&](int64_t col) {
      float gf[4];
      grad4<OUTER>(g, row, col, 1, gf);
      update1<TM, TL>(c, gf[0], p, m, v, lowp, row, col);
    };
    if (vec) {
      const int64_t col = base + 4 * threadIdx.x;
      if (col + 4 > cols) {                          // the row's last 1-3 elements, or none
        for (int64_t e = col; e < cols; ++e) scalar(e);
        continue;
      }
      float gf[4];
      grad4<OUTER>(g, row, col, 4, gf);
      update4<TM, TL>(c, gf, p, m, v, lowp, row, col);
    } else {
      for (int e = 0; e < 4; ++e) {
        const int64_t col = base + threadIdx.x + e * kThreads;
        if (col >= cols) break;
        scalar(col);
      }
    }
  }
}

// From rank kTiledRank on, the gradient from its factors by tiles of kTileRows x kTileCols of one
// student: the tile's slices of a (K x rows) and b (K x cols) staged in shared memory once, each
// of 128 threads makes 4 x 4 elements' gradients from them (a slice serves the whole tile: a few
// bytes of shared-memory reads an element instead of K cache reads of b), then updates them as
// the row kernel does. (The position columns from the code's halves, rank 32 for ttt-l14; the
// trigger columns, rank one, stay row by row, as in the Triton table.)
constexpr int kTiledRank = 16, kMaxTiledRank = 64;
constexpr int kTileRows = 32, kTileCols = 64, kTileThreads = 128;

template <typename TM, typename TL>
__global__ void __launch_bounds__(kTileThreads)
    adam_tiles_kernel(Rows<float> p, GradSrc g, Rows<TM> m, Rows<TM> v, Rows<TL> lowp, int64_t students,
                      int64_t cols, const float* __restrict__ step, const float* __restrict__ lr, double beta1,
                      double beta2, float omb1, float omb2, float eps, bool vec) {
  extern __shared__ float smem[];
  float* sa = smem;                       // (K, kTileRows)
  float* sb = smem + g.k * kTileRows;     // (K, kTileCols)
  const AdamCoef c = coefficients(step, lr, beta1, beta2, omb1, omb2, eps);
  const int64_t rps = g.rows_per_student;
  const int64_t row_tiles = ceil_div(rps, kTileRows), col_tiles = ceil_div(cols, kTileCols);
  const int64_t per_student = row_tiles * col_tiles, tiles = students * per_student;
  const int cg = threadIdx.x % (kTileCols / 4), rg = threadIdx.x / (kTileCols / 4);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t s = tile / per_student, rest = tile - s * per_student;
    const int64_t i0 = (rest / col_tiles) * kTileRows, c0 = (rest % col_tiles) * kTileCols;
    __syncthreads();                      // the previous tile's reads of the slices are done
    for (int idx = threadIdx.x; idx < g.k * kTileRows; idx += kTileThreads) {
      const int k = idx / kTileRows, r = idx - k * kTileRows;
      sa[idx] = i0 + r < rps ? g.a[s * g.a_s + k * g.a_k + i0 + r] : 0.0f;
    }
    for (int idx = threadIdx.x; idx < g.k * kTileCols; idx += kTileThreads) {
      const int k = idx / kTileCols, c = idx - k * kTileCols;
      sb[idx] = c0 + c < cols ? g.b[s * g.b_s + k * g.b_k + c0 + c] : 0.0f;
    }
    __syncthreads();
    float acc[4][4] = {};
    for (int k = 0; k < g.k; ++k) {
      const float4 bv = reinterpret_cast<const float4*>(sb + k * kTileCols)[cg];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float av = sa[k * kTileRows + rg * 4 + j];
        acc[j][0] = fmaf(av, bv.x, acc[j][0]); acc[j][1] = fmaf(av, bv.y, acc[j][1]);
        acc[j][2] = fmaf(av, bv.z, acc[j][2]); acc[j][3] = fmaf(av, bv.w, acc[j][3]);
      }
    }
    const int64_t col = c0 + 4 * cg;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = i0 + rg * 4 + j;
      if (i >= rps || col >= cols) continue;
      const int64_t row = s * rps + i;
      if (vec && col + 4 <= cols) {
        update4<TM, TL>(c, acc[j], p, m, v, lowp, row, col);
      } else {
        for (int e = 0; e < 4 && col + e < cols; ++e) update1<TM, TL>(c, acc[j][e], p, m, v, lowp, row, col + e);
      }
    }
  }
}


size_t dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// The tiles kernel's grid for `n` tiles: as many blocks as are resident at once, each striding
// over the tiles (each block stages the factors' slices once a tile).
template <class Kernel>
cudaError_t resident_grid(Kernel kernel, int threads, size_t smem, int64_t n, unsigned* blocks) {
  int device = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * device_sm_count(device);
  *blocks = static_cast<unsigned>(n < resident ? n : resident);
  return cudaSuccess;
}

// A store that streams past the caches (st.global.cs): the reset's stores are read back by no
// one before the step's first kernels, and plain ones halved its rate (see the header).
template <typename T>
__device__ __forceinline__ void store_streaming(T* p, const T& v) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16, "a 2 to 16-byte value");
  if constexpr (sizeof(T) == 16) {
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
  } else if constexpr (sizeof(T) == 8) {
    __stcs(reinterpret_cast<uint2*>(p), *reinterpret_cast<const uint2*>(&v));
  } else if constexpr (sizeof(T) == 4) {
    __stcs(reinterpret_cast<unsigned*>(p), *reinterpret_cast<const unsigned*>(&v));
  } else {
    __stcs(reinterpret_cast<unsigned short*>(p), *reinterpret_cast<const unsigned short*>(&v));
  }
}

// The reset: tile t of the snapshot (kTile elements) read once, stored into every one of the
// `students` copies of dst (and of lowp, rounded to nearest even), 16 bytes at a time when `vec`
// (n a multiple of 4 and every buffer aligned for it), element by element otherwise; streaming.
template <typename TL>
__global__ void __launch_bounds__(kThreads)
    broadcast_kernel(float* __restrict__ dst, const float* __restrict__ src, TL* __restrict__ lowp, int64_t n,
                     int64_t students, bool vec) {
  for (int64_t t = blockIdx.x; t * kTile < n; t += gridDim.x) {
    if (vec) {
      const int64_t e = t * kTile + 4 * static_cast<int64_t>(threadIdx.x);
      if (e >= n) continue;
      const float4 x = *reinterpret_cast<const float4*>(src + e);
      Vec4<TL> xl;
      xl.x[0] = from_f32<TL>(x.x); xl.x[1] = from_f32<TL>(x.y);
      xl.x[2] = from_f32<TL>(x.z); xl.x[3] = from_f32<TL>(x.w);
      for (int64_t s = 0; s < students; ++s) {
        store_streaming(reinterpret_cast<float4*>(dst + s * n + e), x);
        if (lowp != nullptr) store_streaming(reinterpret_cast<Vec4<TL>*>(lowp + s * n + e), xl);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = t * kTile + threadIdx.x + j * kThreads;
        if (e >= n) break;
        const float x = src[e];
        const TL xl = from_f32<TL>(x);
        for (int64_t s = 0; s < students; ++s) {
          store_streaming(dst + s * n + e, x);
          if (lowp != nullptr) store_streaming(lowp + s * n + e, xl);
        }
      }
    }
  }
}

}  // namespace

cudaError_t broadcast(float* dst, const float* src, void* lowp, DType lowp_t, int64_t n, int64_t students,
                      cudaStream_t stream) {
  if (n <= 0 || students <= 0) return cudaSuccess;
  const bool vec = n % 4 == 0 && aligned(dst, 16) && aligned(src, 16) && aligned(lowp, 4 * dtype_bytes(lowp_t));
  const int64_t tiles = ceil_div(n, kTile);
  const unsigned blocks = static_cast<unsigned>(tiles < kMaxGrid ? tiles : kMaxGrid);
  return APM_DISPATCH_DTYPE(lowp_t, TL, [&] {
    broadcast_kernel<TL><<<blocks, kThreads, 0, stream>>>(dst, src, static_cast<TL*>(lowp), n, students, vec);
    return launch_status();
  });
}

cudaError_t adam(const AdamBuffers& b, int64_t rows, int64_t cols, const float* step, const float* lr,
                 double beta1, double beta2, double eps, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (b.moment_t == DType::kFloat16) return cudaErrorInvalidValue;   // fp32 or bf16 moments
  const bool outer = b.grads == nullptr;
  if (outer && (b.a == nullptr || b.b == nullptr || b.k < 0 || b.rows_per_student <= 0 || rows >= (int64_t{1} << 31))) {
    return cudaErrorInvalidValue;
  }
  if (!outer && b.ld_p == cols && b.ld_g == cols && b.ld_m == cols && b.ld_v == cols &&
      (b.lowp == nullptr || b.ld_l == cols)) {
    cols *= rows;   // every buffer contiguous: one row (the flat buffers' case)
    rows = 1;
  }
  const size_t mb = 4 * dtype_bytes(b.moment_t), lb = 4 * dtype_bytes(b.lowp_t);
  // 16-byte access of 4 elements: every row's start aligned (the base, and the row stride when
  // there are several rows); a row's last elements past a multiple of 4 go one by one
  auto rows_aligned = [rows](const void* ptr, int64_t ld, size_t elem, size_t bytes) {
    return ptr == nullptr ||
           (aligned(ptr, bytes) && (rows == 1 || (ld * static_cast<int64_t>(elem)) % static_cast<int64_t>(bytes) == 0));
  };
  const bool tiled = outer && b.k >= kTiledRank && b.k <= kMaxTiledRank && rows % b.rows_per_student == 0;
  const bool vec = rows_aligned(b.params, b.ld_p, 4, 16) &&
                   (outer ? tiled || (aligned(b.b, 16) && b.b_k % 4 == 0 && b.b_s % 4 == 0)
                          : rows_aligned(b.grads, b.ld_g, 4, 16)) &&
                   rows_aligned(b.exp_avg, b.ld_m, dtype_bytes(b.moment_t), mb) &&
                   rows_aligned(b.exp_avg_sq, b.ld_v, dtype_bytes(b.moment_t), mb) &&
                   rows_aligned(b.lowp, b.ld_l, dtype_bytes(b.lowp_t), lb);
  const int64_t tiles = rows * ceil_div(cols, kTile);
  const GradSrc src{{b.grads, b.ld_g}, b.a, b.b, b.a_s, b.a_k, b.b_s, b.b_k, b.rows_per_student, b.k};
  const Rows<float> p{b.params, b.ld_p};
  // 1 - beta in double, then rounded (as torch does): 1.0f - 0.999f is off by 1e-5 relative
  const float omb1 = static_cast<float>(1.0 - beta1), omb2 = static_cast<float>(1.0 - beta2);
  return APM_DISPATCH_DTYPE(b.moment_t, TM, [&] {
    return APM_DISPATCH_DTYPE(b.lowp_t, TL, [&] {
      const Rows<TM> m{static_cast<TM*>(b.exp_avg), b.ld_m}, v{static_cast<TM*>(b.exp_avg_sq), b.ld_v};
      const Rows<TL> l{static_cast<TL*>(b.lowp), b.ld_l};
      if (tiled) {
        auto* kernel = adam_tiles_kernel<TM, TL>;
        const size_t smem = static_cast<size_t>(b.k) * (kTileRows + kTileCols) * sizeof(float);
        const int64_t students = rows / b.rows_per_student;
        const int64_t n = students * ceil_div(b.rows_per_student, kTileRows) * ceil_div(cols, kTileCols);
        unsigned blocks = 0;
        const cudaError_t grid = resident_grid(kernel, kTileThreads, smem, n, &blocks);
        if (grid != cudaSuccess) return grid;
        kernel<<<blocks, kTileThreads, smem, stream>>>(p, src, m, v, l, students, cols, step, lr, beta1, beta2,
                                                       omb1, omb2, static_cast<float>(eps), vec);
        return launch_status();
      }
      auto* kernel = outer ? adam_kernel<TM, TL, true> : adam_kernel<TM, TL, false>;
      const bool packed = vec && rows > 1 && cols < kTile && cols % 4 == 0 && rows * cols < (int64_t{1} << 31);
      const int64_t n = packed ? ceil_div(rows * cols, kTile) : tiles;
      // a block a tile (up to the grid's limit, past it they stride): no barrier and no shared
      // state, so blocks that finish make room at once (for the next tiles, or for the kernels
      // beside it); a resident grid striding over the tiles was 3 % slower (the same A/B)
      const unsigned blocks = static_cast<unsigned>(n < kMaxGrid ? n : kMaxGrid);
      kernel<<<blocks, kThreads, 0, stream>>>(p, src, m, v, l, rows, cols, step, lr, beta1, beta2, omb1, omb2,
                                              static_cast<float>(eps), vec, packed);
      return launch_status();
    });
  });
}

}  // namespace apm
