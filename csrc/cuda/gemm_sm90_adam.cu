// SM90 weight gradient with Adam in its epilogue: dW[s] = dy[s]^T x[s] is never written; each
// consumer warp group, once its 128 x 128 tile of dW is summed in registers, reads that tile's
// weights and moments, applies the update (adam_update.cuh: the Adam kernels' arithmetic, bit for
// bit) and writes the weights, the moments and the weights' bf16 copy. 26 B of memory traffic a
// parameter (22 with bf16 moments) instead of the 4 the GEMM writes plus the update's 30.
//
// Schedule: cooperative (both consumer warp groups on one 128 x 128 tile, 64 sums a thread), not
// ping-pong (one warp group's epilogue beside the other's products, 128 sums a thread). The
// epilogue is memory bound and latency bound: an SM needs about 32 KB of loads in flight to draw
// its share of the H200's bandwidth (4.2 TB/s over 132 SMs, ~1 us a load). Cooperative: 256
// threads with 16 elements' state (12 B each) in flight, 49 KB. Ping-pong: one warp group in its
// epilogue at a time, 128 threads with 8 elements in flight (16 spilled at 168 registers), 12 KB,
// a third of the rate, where the products it hides take about half as long as the epilogue at
// full rate (a tile: 34 MFLOP at rank 1024, ~6 us on an SM; 426 KB of state, ~13 us).
// Measured on the H200 (b73729e): slower than the GEMM then Adam, 0.128 against 0.095 ms for
// mlp.1's weight at one image (26 B a parameter at 1.7 TB/s), so the engine keeps the GEMM
// (`layer_factors` off; benchmarks/results/h200/b73729e-layer-factors/).
//
// The mainloop is the backward-weight family's (gemm_sm90_bwd_weight.cu: A = dy^T M-major, B =
// x^T N-major, TMA + wgmma, fp32 sums); the epilogue is this file's own collective (no shared
// memory: every thread updates the elements of its accumulators, two adjacent columns at a time
// with 8-byte accesses where the rows allow it), wrapped by CUTLASS's adapter for the
// warp-specialized kernels. No split-K: the update needs the whole sum.
#include "apm_kernels.h"

#if defined(APM_FAST_SM90A) && !defined(APM_FAST_NO_CUTLASS)
#include <cuda_bf16.h>

#include <cutlass/epilogue/collective/detail.hpp>

#include "adam_update.cuh"
#include "dtype_util.cuh"
#include "gemm_sm90_impl.cuh"

namespace apm {
namespace sm90 {
namespace {

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T x[2];
};

// The epilogue collective: Adam over the tile's elements. TM: the moments' storage type.
template <typename TM>
class AdamEpilogue {
 public:
  // accumulators whose loads are in flight together: 16 keeps the consumer warp groups within
  // the kernel's 168 registers a thread (64 of them the tile's sums; ptxas, sm_90a: 32 spilled)
  static constexpr int kBatch = 16;
  using EpilogueSchedule = cutlass::epilogue::NoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementC = void;
  using ElementD = float;
  using ElementAccumulator = float;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct ThreadEpilogueOp {      // named by the device adapter only (a type, never run)
    using ElementOutput = float;
    using ElementAccumulator = float;
    using ElementCompute = float;
    using ElementD = float;
  };

  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  // The state of every student: `rows` (the problem's M) rows of its weight, `ld` apart in every
  // buffer (rows * ld < 2^31: 32-bit offsets inside a student's block); the moments TM; `lowp`
  // (bf16) may be null. `pairs`: ld even and every base aligned for two elements at a time.
  struct Arguments {
    float* p = nullptr;
    TM* m = nullptr;
    TM* v = nullptr;
    __nv_bfloat16* lowp = nullptr;
    int64_t ld = 0;
    const float* step = nullptr;
    const float* lr = nullptr;
    double beta1 = 0.9, beta2 = 0.999;
    float omb1 = 0.1f, omb2 = 0.001f, eps = 1e-8f;
    bool pairs = false;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.p != nullptr && args.m != nullptr && args.v != nullptr && args.step != nullptr &&
           args.lr != nullptr;
  }

  CUTLASS_HOST_DEVICE
  AdamEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    static_assert(is_static<FrgLayout>::value, "the accumulators' layout is static");
    const int64_t M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const auto m_coord = get<0>(blk_coord_mnkl), n_coord = get<1>(blk_coord_mnkl);
    const int64_t s = get<3>(blk_coord_mnkl);
    // the (row, column) of every accumulator of this thread
    Tensor cD = local_tile(make_identity_tensor(make_shape(static_cast<int>(M), static_cast<int>(N))),
                           take<0, 2>(blk_shape_mnk), make_coord(m_coord, n_coord));
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators), "one coordinate an accumulator");
    const AdamCoef c = coefficients(params_.step, params_.lr, params_.beta1, params_.beta2, params_.omb1,
                                    params_.omb2, params_.eps);
    const int64_t block = s * M * params_.ld;    // the student's block in every buffer
    float* p = params_.p + block;
    TM* m = params_.m + block;
    TM* v = params_.v + block;
    __nv_bfloat16* l = params_.lowp == nullptr ? nullptr : params_.lowp + block;
    const int ld = static_cast<int>(params_.ld);
    constexpr int kCount = decltype(size(accumulators))::value;
    static_assert(kCount % kBatch == 0, "whole batches of accumulators");
    // Batches of kBatch accumulators (kBatch / 2 pairs of adjacent columns): every load of a batch
    // is issued before its first store, so that their latencies overlap (the stores of a batch
    // could alias the next one's loads as far as the compiler knows: without batches each pair
    // would wait out a whole memory latency).
    CUTLASS_PRAGMA_UNROLL
    for (int i0 = 0; i0 < kCount; i0 += kBatch) {
      float pf[kBatch], mf[kBatch], vf[kBatch];
      bool pair[kBatch / 2], in[kBatch];
      int at[kBatch];                          // the element's offset in the student's block
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBatch; ++j) {
        const int r = get<0>(tCcD(i0 + j)), col = get<1>(tCcD(i0 + j));
        in[j] = r < M && col < N;
        at[j] = r * ld + col;
        mf[j] = vf[j] = 0.0f;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBatch; j += 2) {
        // two adjacent columns of one row, both inside the problem: one 8-byte access (4 for
        // 16-bit moments and the copy) where the rows allow it
        pair[j / 2] = params_.pairs && in[j] && in[j + 1] && at[j + 1] == at[j] + 1 && (at[j] & 1) == 0;
        if (pair[j / 2]) {
          const float2 pv = *reinterpret_cast<const float2*>(p + at[j]);
          pf[j] = pv.x;
          pf[j + 1] = pv.y;
          if (!c.fresh) {
            const Pair<TM> mv = *reinterpret_cast<const Pair<TM>*>(m + at[j]);
            const Pair<TM> vv = *reinterpret_cast<const Pair<TM>*>(v + at[j]);
            mf[j] = to_f32<TM>(mv.x[0]);
            mf[j + 1] = to_f32<TM>(mv.x[1]);
            vf[j] = to_f32<TM>(vv.x[0]);
            vf[j + 1] = to_f32<TM>(vv.x[1]);
          }
          continue;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int e = j; e < j + 2; ++e) {
          pf[e] = in[e] ? p[at[e]] : 0.0f;
          if (in[e] && !c.fresh) {
            mf[e] = to_f32<TM>(m[at[e]]);
            vf[e] = to_f32<TM>(v[at[e]]);
          }
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBatch; ++j) adam_one(c, accumulators(i0 + j), pf[j], mf[j], vf[j]);
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBatch; j += 2) {
        if (pair[j / 2]) {
          Pair<TM> mo, vo;
          Pair<__nv_bfloat16> lo;
          mo.x[0] = from_f32<TM>(mf[j]);
          mo.x[1] = from_f32<TM>(mf[j + 1]);
          vo.x[0] = from_f32<TM>(vf[j]);
          vo.x[1] = from_f32<TM>(vf[j + 1]);
          *reinterpret_cast<float2*>(p + at[j]) = make_float2(pf[j], pf[j + 1]);
          *reinterpret_cast<Pair<TM>*>(m + at[j]) = mo;
          *reinterpret_cast<Pair<TM>*>(v + at[j]) = vo;
          if (l != nullptr) {
            lo.x[0] = from_f32<__nv_bfloat16>(pf[j]);
            lo.x[1] = from_f32<__nv_bfloat16>(pf[j + 1]);
            *reinterpret_cast<Pair<__nv_bfloat16>*>(l + at[j]) = lo;
          }
          continue;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int e = j; e < j + 2; ++e) {
          if (!in[e]) continue;
          p[at[e]] = pf[e];
          m[at[e]] = from_f32<TM>(mf[e]);
          v[at[e]] = from_f32<TM>(vf[e]);
          if (l != nullptr) l[at[e]] = from_f32<__nv_bfloat16>(pf[e]);
        }
      }
    }
  }

 private:
  Params params_;
};

// A = dy^T (M-major), B = x^T (N-major), as the backward-weight family; 128 x 128 tiles, the
// cooperative schedule.
template <typename TM>
using AdamWgrad = Sm90Kernel<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, Shape<_128, _128, _64>,
                             cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<AdamEpilogue<TM>>,
                             cutlass::gemm::KernelTmaWarpSpecializedCooperative>;


template <typename TM>
cudaError_t run_adam(const GemmParams& p, const AdamBuffers& b, const float* step, const float* lr, double beta1,
                     double beta2, double eps, int device, void* workspace, size_t* workspace_size,
                     cudaStream_t stream) {
  using G = AdamWgrad<TM>;
  auto args = mainloop_args<G>(p, device);
  auto& e = args.epilogue;
  e.p = b.params;
  e.m = static_cast<TM*>(b.exp_avg);
  e.v = static_cast<TM*>(b.exp_avg_sq);
  e.lowp = static_cast<__nv_bfloat16*>(b.lowp);
  e.ld = b.ld_p;
  e.step = step;
  e.lr = lr;
  e.beta1 = beta1;
  e.beta2 = beta2;
  // 1 - beta in double, then rounded (as the Adam kernels and torch do)
  e.omb1 = static_cast<float>(1.0 - beta1);
  e.omb2 = static_cast<float>(1.0 - beta2);
  e.eps = static_cast<float>(eps);
  e.pairs = b.ld_p % 2 == 0 && aligned(b.params, 8) && aligned(b.exp_avg, 2 * sizeof(TM)) &&
            aligned(b.exp_avg_sq, 2 * sizeof(TM)) && aligned(b.lowp, 4);
  return run_args<G>(args, workspace, stream, workspace_size);
}

}  // namespace

cudaError_t run_backward_weight_adam(const GemmParams& p, const AdamBuffers& b, const float* step, const float* lr,
                                     double beta1, double beta2, double eps, int device, void* workspace,
                                     size_t* workspace_size, cudaStream_t stream) {
  // one row stride in every buffer, 32-bit offsets inside a student's block
  if (b.lowp != nullptr && (b.lowp_t != DType::kBFloat16 || b.ld_l != b.ld_p)) return cudaErrorNotSupported;
  if (b.ld_m != b.ld_p || b.ld_v != b.ld_p || p.m * b.ld_p >= (int64_t{1} << 31)) return cudaErrorNotSupported;
  if (b.moment_t == DType::kFloat32) {
    return run_adam<float>(p, b, step, lr, beta1, beta2, eps, device, workspace, workspace_size, stream);
  }
  if (b.moment_t == DType::kBFloat16) {
    return run_adam<__nv_bfloat16>(p, b, step, lr, beta1, beta2, eps, device, workspace, workspace_size, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace sm90
}  // namespace apm
#endif
