// SM90 forward GEMM: y = act(x w^T + b) in bf16, bias and ReLU fused in the epilogue (EVT).
#include "apm_kernels.h"

#if defined(APM_FAST_SM90A) && !defined(APM_FAST_NO_CUTLASS)
#include "gemm_sm90_impl.cuh"

namespace apm {
namespace sm90 {
namespace {

// ReLU switched at run time (one kernel for the layers with and without it): CUTLASS hands the
// Arguments member to the epilogue as a kernel parameter.
struct MaybeReluArgs {
  int enabled = 0;
};

template <class T>
struct MaybeRelu {
  using Arguments = MaybeReluArgs;
  CUTLASS_HOST_DEVICE T operator()(T const& x, Arguments const& args = Arguments()) const {
    return (args.enabled && x < T(0)) ? T(0) : x;
  }
};

template <class T, int N>
struct MaybeRelu<cutlass::Array<T, N>> {
  using Arguments = MaybeReluArgs;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x,
                                                      Arguments const& args = Arguments()) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = (args.enabled && x[i] < T(0)) ? T(0) : x[i];
    return y;
  }
};

// A = x (M x K, K-major), B = w (N x K, K-major), D = y (M x N) bf16; bias per column (per student).
template <int TileN>
using FwdGemm = Sm90Gemm<
    cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, bf16,
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<MaybeRelu, bf16, float, bf16, void, float>, TileN>;

template <int TileN>
cudaError_t run_forward_tiles(const GemmParams& p, int device, void* workspace, cudaStream_t stream,
                              size_t* workspace_size) {
  return run_one<FwdGemm<TileN>>(p, device, workspace, stream, workspace_size, [&](auto& args) {
    args.epilogue.thread.bias_ptr = static_cast<const bf16*>(p.bias);  // null: no bias
    args.epilogue.thread.dBias = make_stride(_0{}, _1{}, p.bias_sb);
    args.epilogue.thread.activation.enabled = p.relu ? 1 : 0;
  });
}

}  // namespace

cudaError_t run_forward(const GemmParams& p, int device, void* workspace, cudaStream_t stream,
                        size_t* workspace_size) {
  return narrow_tiles(p, device) ? run_forward_tiles<64>(p, device, workspace, stream, workspace_size)
                                 : run_forward_tiles<128>(p, device, workspace, stream, workspace_size);
}

}  // namespace sm90
}  // namespace apm
#endif
