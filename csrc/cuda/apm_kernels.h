// Launch functions of the apm-fast CUDA kernels.
//
// This header and the .cu files behind it use only CUDA's own headers and CUTLASS/CuTe (no torch),
// so every kernel can be compile-checked with plain nvcc on a machine without a CUDA PyTorch. The
// torch glue (argument checks, allocation, streams) lives in csrc/torch/.
//
// Conventions: element strides (not bytes); every per-student tensor carries a leading batch
// ("student") index; every function enqueues on `stream` and returns the first CUDA error it saw
// (cudaSuccess otherwise); nothing here synchronizes or allocates.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace apm {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Whether `ptr` is a multiple of `bytes` (null counts as aligned: an absent buffer).
inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

const char* dtype_name(DType t);

// ------------------------------------------------------------------------------------------------
// Batched GEMM with a fused epilogue:
//   D[b](i, j) = epi( sum_k A[b](i, k) * B[b](j, k) )     i < m, j < n, b < batch
//   epi(x)     = act(x + bias[b][j]) * (mask[b](i, j) > 0 if mask)   act = ReLU if relu
// X[b](i, j) lives at X + b * X_sb + i * X_s0 + j * X_s1. A batch stride of 0 shares the operand.
// A, B, bias, mask have dtype `in`; D has dtype `out`; accumulation is fp32.
struct GemmParams {
  int64_t batch = 1, m = 0, n = 0, k = 0;
  const void* a = nullptr;    int64_t a_sb = 0, a_sm = 0, a_sk = 0;
  const void* b = nullptr;    int64_t b_sb = 0, b_sn = 0, b_sk = 0;
  void* d = nullptr;          int64_t d_sb = 0, d_sm = 0, d_sn = 0;
  const void* bias = nullptr; int64_t bias_sb = 0;                    // bias[b][j] at bias + b*bias_sb + j
  const void* mask = nullptr; int64_t mask_sb = 0, mask_sm = 0, mask_sn = 0;
  bool relu = false;
  DType in = DType::kBFloat16;
  DType out = DType::kBFloat16;
};

// Portable tiled GEMM (any strides, any of the dtypes above, every epilogue; sm_80 and newer).
cudaError_t gemm_portable(const GemmParams& p, cudaStream_t stream);

// Which SM90 (Hopper, TMA + wgmma) kernel family a problem maps to, if any.
enum class Sm90Family : int {
  kNone = 0,
  kForward = 1,        // A K-major, B K-major, D row-major in `in` dtype; bias, ReLU
  kBackwardInput = 2,  // A K-major, B N-major, D row-major in `in` dtype; ReLU mask required
  kBackwardWeight = 3, // A M-major, B N-major, D row-major fp32; no epilogue
};

// The family that can run `p` (kNone: use gemm_portable). Checks dtypes, layouts, 16-byte
// alignment of every pointer and stride, and that this build holds sm_90a code; it does not look
// at the device (see sm90_device_ok).
Sm90Family sm90_family(const GemmParams& p);

// True when `device` can run this build's sm_90a kernels (compute capability 9.0 exactly).
bool sm90_device_ok(int device);

// Workspace bytes gemm_sm90 needs for `p` (0 for the kernels used here; kept general).
size_t gemm_sm90_workspace_size(const GemmParams& p, int device);

// Runs `p` with the SM90 kernel of sm90_family(p). Returns cudaErrorNotSupported when the family
// is kNone or CUTLASS's can_implement refuses (the caller then uses gemm_portable), another error
// when a launch fails. `workspace` must hold gemm_sm90_workspace_size(p) bytes (may be null if 0).
cudaError_t gemm_sm90(const GemmParams& p, int device, void* workspace, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Streaming multiprocessors of `device` (one query per device, then cached; 132, an H100's, if the
// query fails): the one SM count of the launch plans and the bindings (device.cu).
int device_sm_count(int device);

// ------------------------------------------------------------------------------------------------
// Column sums over row groups: out[g][c] = sum_{r < R} in[g][r][c], `in` contiguous (G, R, C) of
// dtype `in_t`, out (G, C) fp32 (`out_ld` between groups). Large R is split over `chunks` blocks
// whose partial sums go to `partial` (G, chunks, C) fp32 and are then summed (deterministic).
int colsum_chunks(int64_t groups, int64_t rows, int64_t cols, int sm_count);
cudaError_t colsum(const void* in, DType in_t, int64_t groups, int64_t rows, int64_t cols,
                   float* out, int64_t out_ld, float* partial, int chunks, float scale,
                   cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Trigger split, first layer: a[s][b*L + l][h] = ReLU(p[s][l][h] + u[s][b][h]).
// p (S, L, H) dtype t, u (S, B, H) fp32, a (S, B*L, H) dtype t; all contiguous.
cudaError_t first_layer_act(const void* p, const float* u, void* a, DType t, int64_t S, int64_t B,
                            int64_t L, int64_t H, cudaStream_t stream);
// The same from the position code's separable form: q (S, width + height, H) fp32 holds Q, and
// a[s][b*L + y*width + x][h] = ReLU(q[s][x][h] + q[s][width + y][h] + u[s][b][h]), L = height*width.
cudaError_t first_layer_act_halves(const float* q, const float* u, void* a, DType t, int64_t S, int64_t B,
                                   int64_t height, int64_t width, int64_t H, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Single-query attention pool (spec section 3), forward and backward; see TorchPrimitives.pool_fwd.
// f (S, B, L, D) dtype t, pos (L, D) dtype t, kt (S, H, D) fp32; outputs fp32 unless said.
constexpr int kPoolMaxHeads = 16;
constexpr int kPoolMaxWidth = 2048;   // D: shared memory holds a tile's H*D sums and 8 rows of D

struct PoolShape {
  int64_t S, B, L, D, H;
};

// Both directions work on tiles of `tile_rows` rows of one image (pool_tile_rows picks it for the
// shape and GPU; a multiple of 8, at most 64): pool_tiles(sh, tile_rows) tiles per image.
int pool_tile_rows(PoolShape sh, int sm_count);
int64_t pool_tiles(PoolShape sh, int tile_rows);

// Scratch (fp32), per image and tile: part_m, part_s (S*B, tiles, H), part_acc (S*B, tiles, H, D).
cudaError_t pool_fwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, int tile_rows, float* part_m, float* part_s, float* part_acc,
                     float* sbar, float* lse, cudaStream_t stream);

// df (S, B, L, D) of dtype df_t (t or fp32); dkt (S, H, D) fp32. Scratch (fp32): partial (S*B, tiles, H, D).
cudaError_t pool_bwd(const void* f, const void* pos, DType t, const float* kt, float scale,
                     PoolShape sh, const float* sbar, const float* lse, const float* dsbar,
                     void* df, DType df_t, float* dkt, int tile_rows, float* partial,
                     cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Adam (no weight decay), in place, capturable: the update number `step` (1 for the first) and
// `lr` are read from device memory. Every buffer is `rows` rows of `cols` contiguous elements,
// its own row stride (ld_*) apart. Parameters fp32; moments fp32 or bf16 (moment_t); when `lowp`
// is not null it receives the new parameters in dtype lowp_t. The gradient is `grads` (fp32) or,
// when `grads` is null, built from its factors: row r = s * rows_per_student + i gets
// sum_{k < k} a[s a_s + k a_k + i] b[s b_s + k b_k + col] (fp32; a rank-k weight gradient).
// At update 1 the moments are taken as zeros and not read.
struct AdamBuffers {
  float* params;
  int64_t ld_p;
  const float* grads;
  int64_t ld_g;
  void* exp_avg;
  int64_t ld_m;
  void* exp_avg_sq;
  int64_t ld_v;
  DType moment_t;
  void* lowp;
  int64_t ld_l;
  DType lowp_t;
  const float* a;
  const float* b;
  int64_t a_s, a_k, b_s, b_k, rows_per_student;
  int k;
};

cudaError_t adam(const AdamBuffers& buffers, int64_t rows, int64_t cols, const float* step, const float* lr,
                 double beta1, double beta2, double eps, cudaStream_t stream);

// The reset of `students` copies of a parameter to one snapshot: dst[s * n + e] = src[e] for
// every student s (dst contiguous, fp32) and, when `lowp` is not null, lowp[s * n + e] = src[e]
// in dtype lowp_t (rounded to nearest even). The snapshot is read once.
cudaError_t broadcast(float* dst, const float* src, void* lowp, DType lowp_t, int64_t n, int64_t students,
                      cudaStream_t stream);

}  // namespace apm
