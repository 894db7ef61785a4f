// The CUTLASS 3.x SM90 GEMM template shared by the three kernel families (gemm_sm90_*.cu): one
// family per file so that they compile in parallel. See gemm_sm90.cu for the design.
#pragma once

// The kernels must be built without device-side asserts: an assert inside the wgmma pipeline is a
// function call, which makes ptxas serialize the wgmma instructions (warning C7510, a large
// slowdown). The build passes -DNDEBUG; this makes sure of it.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "apm_kernels.h"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/bfloat16.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

namespace apm {
namespace sm90 {

using namespace cute;
using bf16 = cutlass::bfloat16_t;


// TileN: 128 (the default), or 64 for problems whose 128 x 128 tiles leave most SMs idle (at one
// image, fc3 (1024 x 1024: 64 tiles) and the head (1024 x 768: 48 tiles) on 132 SMs); see
// narrow_tiles().
template <class LayoutA, class LayoutB, class ElementD, class FusionOp, int TileN = 128>
struct Sm90Gemm {
  using TileShape = Shape<_128, Int<TileN>, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignD,          // no C operand
      ElementD, cutlass::layout::RowMajor, kAlignD,
      cutlass::epilogue::TmaWarpSpecializedCooperative, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      bf16, LayoutA, 8, bf16, LayoutB, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

// Whether a problem runs on 128 x 64 tiles: its 128 x 128 tiles fill at most half of the SMs
// (one partial wave of less than half the GPU), so halving the tile width doubles the SMs at work.
inline bool narrow_tiles(const GemmParams& p, int device) {
  const int64_t tiles = p.batch * ((p.m + 127) / 128) * ((p.n + 127) / 128);
  return 2 * tiles <= device_sm_count(device);
}

// Strides as CUTLASS wants them: (row, column, batch) with the unit one static.
template <class S>
S stride_mk(int64_t s0, int64_t s1, int64_t sb);

template <>
inline Stride<int64_t, _1, int64_t> stride_mk(int64_t s0, int64_t, int64_t sb) {
  return make_stride(s0, _1{}, sb);
}
template <>
inline Stride<_1, int64_t, int64_t> stride_mk(int64_t, int64_t s1, int64_t sb) {
  return make_stride(_1{}, s1, sb);
}

template <class G>
typename G::Gemm::Arguments make_args(const GemmParams& p, int device) {
  using ElementD = typename G::Gemm::ElementD;
  typename G::Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k),
                        static_cast<int>(p.batch)};
  args.mainloop.ptr_A = static_cast<const bf16*>(p.a);
  args.mainloop.dA = stride_mk<typename G::StrideA>(p.a_sm, p.a_sk, p.a_sb);
  args.mainloop.ptr_B = static_cast<const bf16*>(p.b);
  args.mainloop.dB = stride_mk<typename G::StrideB>(p.b_sn, p.b_sk, p.b_sb);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_mk<typename G::StrideC>(p.d_sm, p.d_sn, p.d_sb);
  args.epilogue.ptr_D = static_cast<ElementD*>(p.d);
  args.epilogue.dD = stride_mk<typename G::StrideD>(p.d_sm, p.d_sn, p.d_sb);
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = device_sm_count(device);
  return args;
}

// Runs one problem (its batch strides are real strides: shared operands are split by the caller).
// With `workspace_size` only reports the workspace bytes it needs.
template <class G, class SetFusion>
cudaError_t run_one(const GemmParams& p, int device, void* workspace, cudaStream_t stream,
                    size_t* workspace_size, SetFusion set_fusion) {
  auto args = make_args<G>(p, device);
  set_fusion(args);
  if (workspace_size != nullptr) {
    *workspace_size = G::Gemm::get_workspace_size(args);
    return cudaSuccess;
  }
  typename G::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  cutlass::Status st = gemm.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess) {
    cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? e : cudaErrorLaunchFailure;
  }
  st = gemm.run(stream);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return st == cutlass::Status::kSuccess ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace sm90
}  // namespace apm
