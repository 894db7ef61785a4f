// SM90 input-gradient GEMM: dx = (dy w) * (x > 0) in bf16; the ReLU mask x is read by TMA as an
// auxiliary epilogue input (EVT), so the gradient is masked before its only store.
#include "apm_kernels.h"

#if defined(APM_FAST_SM90A) && !defined(APM_FAST_NO_CUTLASS)
#include "gemm_sm90_impl.cuh"

namespace apm {
namespace sm90 {
namespace {

// d * (x > 0): the gradient through the ReLU that produced the layer input x. (CUTLASS's dReLU
// tests x != 0, which agrees for post-ReLU x; this states the contract's test exactly.)
template <class T>
struct ReluMaskGrad {
  CUTLASS_HOST_DEVICE T operator()(T const& d, T const& x) const { return x > T(0) ? d : T(0); }
};

template <class T, int N>
struct ReluMaskGrad<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& d,
                                                      cutlass::Array<T, N> const& x) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = x[i] > T(0) ? d[i] : T(0);
    return y;
  }
};

// A = dy (M x N_out, K-major), B = w (N_out x K_in read as K_in x N_out: N-major), D = dx bf16.
template <int TileN>
using BwdInputGemm = Sm90Gemm<
    cutlass::layout::RowMajor, cutlass::layout::RowMajor, bf16,
    cutlass::epilogue::fusion::LinCombDeEltAct<cutlass::layout::RowMajor, ReluMaskGrad, bf16, float,
                                               bf16, void, float>, TileN>;

template <int TileN>
cudaError_t run_backward_input_tiles(const GemmParams& p, int device, void* workspace,
                                     cudaStream_t stream, size_t* workspace_size) {
  return run_one<BwdInputGemm<TileN>>(p, device, workspace, stream, workspace_size, [&](auto& args) {
    args.epilogue.thread.aux_ptr = static_cast<const bf16*>(p.mask);
    args.epilogue.thread.dAux = make_stride(p.mask_sm, _1{}, p.mask_sb);
  });
}

}  // namespace

cudaError_t run_backward_input(const GemmParams& p, int device, void* workspace,
                               cudaStream_t stream, size_t* workspace_size) {
  return narrow_tiles(p, device)
             ? run_backward_input_tiles<64>(p, device, workspace, stream, workspace_size)
             : run_backward_input_tiles<128>(p, device, workspace, stream, workspace_size);
}

}  // namespace sm90
}  // namespace apm
#endif
