// SM90 input-gradient GEMMs: dx = (dy w) * (x > 0) in bf16; the ReLU mask x is read by TMA as an
// auxiliary epilogue input (EVT), so the gradient is masked before its only store. The first
// layer's (kFirstLayerInput) builds its mask from the pre-activation's two parts, p (TMA, as x)
// and the image's row u (a row broadcast), and sums the masked gradient's columns in the same
// epilogue: neither the activation nor a second pass over g1 exists.
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

// (acc, p, u) -> acc where p + u > 0, else 0: the gradient through ReLU(p + u), tested in fp32
// as the contract states it.
template <class T>
struct MaskByPreact {
  CUTLASS_HOST_DEVICE T operator()(T const& d, T const& p, T const& u) const { return p + u > T(0) ? d : T(0); }
};

template <class T, int N>
struct MaskByPreact<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& d,
                                                      cutlass::Array<T, N> const& p,
                                                      cutlass::Array<T, N> const& u) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = p[i] + u[i] > T(0) ? d[i] : T(0);
    return y;
  }
};

}  // namespace
}  // namespace sm90
}  // namespace apm

namespace apm {
namespace sm90 {

// The first layer's input-gradient epilogue as a fusion operation, so that CUTLASS's collective
// builder derives the aux load's shared-memory layout and copy atoms from the epilogue tile, as it
// does for its own LinCombDeEltAct.
struct FirstLayerInputFusion
    : cutlass::epilogue::fusion::LinearCombination<bf16, float, bf16, float> {
  using ElementAux = bf16;
  using GmemLayoutTagAux = cutlass::layout::RowMajor;
  static constexpr int AlignmentAux = 8;
  static constexpr bool IsAuxInSupported = true;
};

}  // namespace sm90
}  // namespace apm

namespace cutlass::epilogue::fusion {

template <int StagesC, int StagesD, int FragmentSize, bool ReuseSmemC, bool DelayTmaStore,
          class CtaTileShapeMNK, class EpilogueTile, class SmemLayoutAtom, class CopyOpS2R>
struct FusionCallbacks<epilogue::Sm90TmaWarpSpecialized<StagesC, StagesD, FragmentSize, ReuseSmemC, DelayTmaStore>,
                       apm::sm90::FirstLayerInputFusion, CtaTileShapeMNK, EpilogueTile, SmemLayoutAtom, CopyOpS2R>
    : Sm90EVT<
          Sm90Compute<epilogue::thread::Identity, cutlass::bfloat16_t, float, FloatRoundStyle::round_to_nearest>,
          Sm90EVT<  // r: the fp32 masked gradient's column sums (per-tile partials, reduced in tile order)
              Sm90RowReduction<plus, plus, plus, 0, CtaTileShapeMNK, float, float,
                               FloatRoundStyle::round_to_nearest, Stride<_0, _1, int64_t>, 4>,
              Sm90EVT<Sm90Compute<apm::sm90::MaskByPreact, float, float, FloatRoundStyle::round_to_nearest>,
                      Sm90AccFetch,
                      Sm90AuxLoad<StagesC, EpilogueTile, cutlass::bfloat16_t, Stride<int64_t, _1, int64_t>,
                                  SmemLayoutAtom, CopyOpS2R, 8>,                                   // p
                      Sm90RowBroadcast<0, CtaTileShapeMNK, float, float, Stride<_0, _1, int64_t>, 4>  // u
                      >>> {
  using Impl = Sm90EVT<
      Sm90Compute<epilogue::thread::Identity, cutlass::bfloat16_t, float, FloatRoundStyle::round_to_nearest>,
      Sm90EVT<Sm90RowReduction<plus, plus, plus, 0, CtaTileShapeMNK, float, float,
                               FloatRoundStyle::round_to_nearest, Stride<_0, _1, int64_t>, 4>,
              Sm90EVT<Sm90Compute<apm::sm90::MaskByPreact, float, float, FloatRoundStyle::round_to_nearest>,
                      Sm90AccFetch,
                      Sm90AuxLoad<StagesC, EpilogueTile, cutlass::bfloat16_t, Stride<int64_t, _1, int64_t>,
                                  SmemLayoutAtom, CopyOpS2R, 8>,
                      Sm90RowBroadcast<0, CtaTileShapeMNK, float, float, Stride<_0, _1, int64_t>, 4>>>>;
  using Operation = apm::sm90::FirstLayerInputFusion;

  struct Arguments {
    // unused by this tree; make_args sets them for every family
    float alpha = 1.0f;
    float beta = 0.0f;
    cutlass::bfloat16_t const* p_ptr = nullptr;
    Stride<int64_t, _1, int64_t> dP = {};
    float const* u_ptr = nullptr;
    Stride<_0, _1, int64_t> dU = {};
    float* r_ptr = nullptr;
    Stride<_0, _1, int64_t> dR = {};

    operator typename Impl::Arguments() const {
      return {
          {                                   // r = column sums of
              {                               // mask(acc, p, u)
                  {},                         // acc
                  {p_ptr, cutlass::bfloat16_t(0), dP},
                  {u_ptr, 0.0f, dU},
                  {}                          // mask
              },
              {r_ptr, 0.0f, dR}               // row reduction
          },
          {}                                  // identity: the bf16 store
      };
    }
  };

  using Impl::Impl;
};

}  // namespace cutlass::epilogue::fusion

namespace apm {
namespace sm90 {
namespace {

using FirstLayerInputGemm = Sm90Gemm<cutlass::layout::RowMajor, cutlass::layout::RowMajor, bf16,
                                     FirstLayerInputFusion, 128>;

}  // namespace

// One tile width: the first layer's H1 columns (4096 for the presets) fill the GPU at one image.
cudaError_t run_first_layer_input(const GemmParams& p, int device, void* workspace, cudaStream_t stream,
                                  size_t* workspace_size) {
  return run_one<FirstLayerInputGemm>(p, device, workspace, stream, workspace_size, [&](auto& args) {
    args.epilogue.thread.p_ptr = static_cast<const bf16*>(p.mask);
    args.epilogue.thread.dP = make_stride(p.mask_sm, _1{}, p.mask_sb);
    args.epilogue.thread.u_ptr = p.mask_row;
    args.epilogue.thread.dU = make_stride(_0{}, _1{}, p.mask_row_sb);
    args.epilogue.thread.r_ptr = p.col_sums;
    args.epilogue.thread.dR = make_stride(_0{}, _1{}, p.col_sums_sb);
  });
}

cudaError_t run_backward_input(const GemmParams& p, int device, void* workspace,
                               cudaStream_t stream, size_t* workspace_size) {
  return narrow_tiles(p, device)
             ? run_backward_input_tiles<64>(p, device, workspace, stream, workspace_size)
             : run_backward_input_tiles<128>(p, device, workspace, stream, workspace_size);
}

}  // namespace sm90
}  // namespace apm
#endif
