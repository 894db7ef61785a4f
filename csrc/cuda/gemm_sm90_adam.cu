// SM90 weight gradient with Adam in its epilogue: dW[s] = dy[s]^T x[s] is never written; each
// consumer warp group, once its 128 x 128 tile of dW is summed in registers, reads that tile's
// weights and moments, applies the update (adam_update.cuh: the Adam kernels' arithmetic, bit for
// bit) and writes the weights, the moments and the weights' bf16 copy. 26 B of memory traffic a
// parameter (22 with bf16 moments) instead of the 4 the GEMM writes plus the update's 30, and the
// update's traffic overlaps the other warp group's products (ping-pong schedule: two consumer
// warp groups on two tiles, one in its epilogue while the other multiplies).
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

  // The state of every student: `rows` (the problem's M) rows of its weight, ld_* apart; the
  // moments TM; `lowp` (bf16) may be null. `pairs`: every row stride even and every base aligned
  // for two elements at a time.
  struct Arguments {
    float* p = nullptr;
    TM* m = nullptr;
    TM* v = nullptr;
    __nv_bfloat16* lowp = nullptr;
    int64_t ld_p = 0, ld_m = 0, ld_v = 0, ld_l = 0;
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
    float* p = params_.p + s * M * params_.ld_p;
    TM* m = params_.m + s * M * params_.ld_m;
    TM* v = params_.v + s * M * params_.ld_v;
    __nv_bfloat16* l = params_.lowp == nullptr ? nullptr : params_.lowp + s * M * params_.ld_l;
    static_assert(decltype(size(accumulators))::value % 2 == 0, "accumulators come in pairs");
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); i += 2) {
      const int r = get<0>(tCcD(i)), col = get<1>(tCcD(i));
      const bool pair = params_.pairs && get<0>(tCcD(i + 1)) == r && get<1>(tCcD(i + 1)) == col + 1 &&
                        (col & 1) == 0 && r < M && col + 1 < N;
      if (pair) {
        float2 pv = *reinterpret_cast<const float2*>(p + r * params_.ld_p + col);
        float pf[2] = {pv.x, pv.y}, mf[2] = {0.0f, 0.0f}, vf[2] = {0.0f, 0.0f};
        if (!c.fresh) {
          const Pair<TM> mv = *reinterpret_cast<const Pair<TM>*>(m + r * params_.ld_m + col);
          const Pair<TM> vv = *reinterpret_cast<const Pair<TM>*>(v + r * params_.ld_v + col);
          mf[0] = to_f32<TM>(mv.x[0]); mf[1] = to_f32<TM>(mv.x[1]);
          vf[0] = to_f32<TM>(vv.x[0]); vf[1] = to_f32<TM>(vv.x[1]);
        }
        Pair<TM> mo, vo;
        Pair<__nv_bfloat16> lo;
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < 2; ++e) {
          adam_one(c, accumulators(i + e), pf[e], mf[e], vf[e]);
          mo.x[e] = from_f32<TM>(mf[e]);
          vo.x[e] = from_f32<TM>(vf[e]);
          lo.x[e] = from_f32<__nv_bfloat16>(pf[e]);
        }
        *reinterpret_cast<float2*>(p + r * params_.ld_p + col) = make_float2(pf[0], pf[1]);
        *reinterpret_cast<Pair<TM>*>(m + r * params_.ld_m + col) = mo;
        *reinterpret_cast<Pair<TM>*>(v + r * params_.ld_v + col) = vo;
        if (l != nullptr) *reinterpret_cast<Pair<__nv_bfloat16>*>(l + r * params_.ld_l + col) = lo;
        continue;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int re = get<0>(tCcD(i + e)), ce = get<1>(tCcD(i + e));
        if (re >= M || ce >= N) continue;
        float pe = p[re * params_.ld_p + ce], me = 0.0f, ve = 0.0f;
        if (!c.fresh) {
          me = to_f32<TM>(m[re * params_.ld_m + ce]);
          ve = to_f32<TM>(v[re * params_.ld_v + ce]);
        }
        adam_one(c, accumulators(i + e), pe, me, ve);
        p[re * params_.ld_p + ce] = pe;
        m[re * params_.ld_m + ce] = from_f32<TM>(me);
        v[re * params_.ld_v + ce] = from_f32<TM>(ve);
        if (l != nullptr) l[re * params_.ld_l + ce] = from_f32<__nv_bfloat16>(pe);
      }
    }
  }

 private:
  Params params_;
};

template <typename TM>
struct AdamWgrad {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using CollectiveEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<AdamEpilogue<TM>>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      bf16, cutlass::layout::ColumnMajor, 8, bf16, cutlass::layout::RowMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
};

bool aligned_to(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

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
  e.ld_p = b.ld_p;
  e.ld_m = b.ld_m;
  e.ld_v = b.ld_v;
  e.ld_l = b.ld_l;
  e.step = step;
  e.lr = lr;
  e.beta1 = beta1;
  e.beta2 = beta2;
  // 1 - beta in double, then rounded (as the Adam kernels and torch do)
  e.omb1 = static_cast<float>(1.0 - beta1);
  e.omb2 = static_cast<float>(1.0 - beta2);
  e.eps = static_cast<float>(eps);
  e.pairs = b.ld_p % 2 == 0 && b.ld_m % 2 == 0 && b.ld_v % 2 == 0 && (b.lowp == nullptr || b.ld_l % 2 == 0) &&
            aligned_to(b.params, 8) && aligned_to(b.exp_avg, 2 * sizeof(TM)) &&
            aligned_to(b.exp_avg_sq, 2 * sizeof(TM)) && aligned_to(b.lowp, 4);
  return run_args<G>(args, workspace, stream, workspace_size);
}

}  // namespace

cudaError_t run_backward_weight_adam(const GemmParams& p, const AdamBuffers& b, const float* step, const float* lr,
                                     double beta1, double beta2, double eps, int device, void* workspace,
                                     size_t* workspace_size, cudaStream_t stream) {
  if (b.lowp != nullptr && b.lowp_t != DType::kBFloat16) return cudaErrorNotSupported;
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
