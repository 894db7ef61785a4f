// SM90 weight-gradient GEMM: dw = dy^T x in fp32 (both operands M-/N-major: the contraction runs
// over the rows of dy and x). Split-K is done by the caller, which batches the contraction.
#include "apm_kernels.h"

#if defined(APM_FAST_SM90A) && !defined(APM_FAST_NO_CUTLASS)
#include "gemm_sm90_impl.cuh"

namespace apm {
namespace sm90 {
namespace {

// A = dy^T (N_out x rows, M-major), B = x^T (K_in x rows, N-major), D = dw (N_out x K_in) fp32.
using BwdWeightGemm = Sm90Gemm<
    cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, float,
    cutlass::epilogue::fusion::LinearCombination<float, float, void, float>>;

}  // namespace

cudaError_t run_backward_weight(const GemmParams& p, int device, void* workspace,
                                cudaStream_t stream, size_t* workspace_size) {
  return run_one<BwdWeightGemm>(p, device, workspace, stream, workspace_size, [](auto&) {});
}

}  // namespace sm90
}  // namespace apm
#endif
