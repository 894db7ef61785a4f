// Hopper GEMMs of the APM MLP: CUTLASS 3.x, TMA loads, wgmma, warp-specialized persistent
// kernels, epilogues fused through CUTLASS's epilogue visitor trees (EVT). This file picks the
// kernel family for a problem and launches it; the kernels are in gemm_sm90_{fwd,bwd_input,
// bwd_weight}.cu (one per file so that they compile in parallel), their template in
// gemm_sm90_impl.cuh.
//
// Why CUTLASS 3.x SM90 and not a hand-written CuTe mainloop or cuBLASLt: CUTLASS's SM90
// collectives are the TMA + wgmma + mbarrier pipelines that reach cuBLAS speed on Hopper, and the
// EVT epilogue applies bias + ReLU (forward) and the ReLU mask (backward) to the accumulators
// before the single bf16 store. cuBLASLt has bias/ReLU epilogues but no mask read from an
// arbitrary tensor, and its headers are not on the machines that compile-check these kernels.
// A hand-written mainloop would have to rebuild the same pipeline to reach the same speed.
//
// Three families, bf16 operands, fp32 accumulation (fp32/fp16 problems, odd sizes and layouts
// these do not take go to the portable kernel of gemm_portable.cu):
//   forward          y = act(x w^T + b)      A = x (K-major), B = w (K-major), bf16 out
//   backward input   dx = (dy w) * (x > 0)   A = dy (K-major), B = w (N-major), bf16 out; the
//                                            mask is read by TMA as an auxiliary epilogue input
//   backward weight  dw = dy^T x             A = dy (M-major), B = x (N-major), fp32 out
// The batch (student) index is CUTLASS's L mode. A shared operand (batch stride 0) is launched
// once per student: TMA descriptors describe a strided batch, not a broadcast one.
//
// Tile 128 x 128 x 64, cooperative schedule (two consumer warp groups on one tile; pipeline
// stages fill the rest of shared memory), cluster 1 x 1: it fills the 132 SMs at one image for
// fc2 (1024 x 2048 -> 128 tiles). Forward and input-gradient problems whose 128 x 128 tiles would
// fill at most half of the SMs (at one image fc3's 1024 x 1024 and the head's 1024 x 768, 64 and
// 48 tiles) run on 128 x 64 tiles instead (narrow_tiles in gemm_sm90_impl.cuh): twice the SMs
// at work. Two instantiations per family keep the compile time small.
// Split-K for the weight gradient is done by the caller (csrc/torch/cuda_gemm_ops.cpp), which
// batches the contraction.
#include "apm_kernels.h"

#if defined(APM_FAST_SM90A) && !defined(APM_FAST_NO_CUTLASS)
#define APM_FAST_HAVE_SM90_GEMM 1
#endif

namespace apm {

#ifdef APM_FAST_HAVE_SM90_GEMM
namespace sm90 {
cudaError_t run_forward(const GemmParams&, int, void*, cudaStream_t, size_t*);
cudaError_t run_backward_input(const GemmParams&, int, void*, cudaStream_t, size_t*);
cudaError_t run_backward_weight(const GemmParams&, int, void*, cudaStream_t, size_t*);
}  // namespace sm90
#endif

namespace {


// `elems` elements of `bytes` each make a whole number of 16-byte units (TMA's rule for strides).
bool mult16(int64_t elems, int bytes) { return (elems * bytes) % 16 == 0; }

int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess) {
    cudaGetLastError();  // clear it; 0 reads as "unknown"
    return 0;
  }
  return v;
}

}  // namespace

bool sm90_device_ok(int device) {
#ifdef APM_FAST_HAVE_SM90_GEMM
  // sm_90a code runs on compute capability 9.0 only (not on a later major). Cached per device
  // (0 unknown, 1 yes, 2 no): it is asked before every GEMM.
  static int known[64] = {0};
  auto query = [device] {
    return device_attr(cudaDevAttrComputeCapabilityMajor, device) == 9 &&
           device_attr(cudaDevAttrComputeCapabilityMinor, device) == 0;
  };
  if (device < 0 || device >= 64) return query();
  if (known[device] == 0) known[device] = query() ? 1 : 2;
  return known[device] == 1;
#else
  (void)device;
  return false;
#endif
}

Sm90Family sm90_family(const GemmParams& p) {
#ifndef APM_FAST_HAVE_SM90_GEMM
  (void)p;
  return Sm90Family::kNone;
#else
  if (p.in != DType::kBFloat16) return Sm90Family::kNone;
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.batch <= 0) return Sm90Family::kNone;
  if (p.m > INT32_MAX || p.n > INT32_MAX || p.k > INT32_MAX || p.batch > INT32_MAX) {
    return Sm90Family::kNone;
  }
  if (!aligned(p.a, 16) || !aligned(p.b, 16) || !aligned(p.d, 16)) return Sm90Family::kNone;
  const int ob = p.out == DType::kFloat32 ? 4 : 2;
  if (!mult16(p.a_sb, 2) || !mult16(p.b_sb, 2) || !mult16(p.d_sb, ob)) return Sm90Family::kNone;
  if (p.d_sn != 1 || !mult16(p.d_sm, ob) || !mult16(p.n, ob)) return Sm90Family::kNone;
  const bool a_kmaj = p.a_sk == 1 && mult16(p.a_sm, 2) && mult16(p.k, 2);
  const bool a_mmaj = p.a_sm == 1 && mult16(p.a_sk, 2) && mult16(p.m, 2);
  const bool b_kmaj = p.b_sk == 1 && mult16(p.b_sn, 2) && mult16(p.k, 2);
  const bool b_nmaj = p.b_sn == 1 && mult16(p.b_sk, 2) && mult16(p.n, 2);
  if (a_kmaj && b_kmaj && p.out == DType::kBFloat16 && p.mask == nullptr) {
    if (p.bias != nullptr && (!aligned(p.bias, 16) || !mult16(p.bias_sb, 2))) return Sm90Family::kNone;
    return Sm90Family::kForward;
  }
  if (a_kmaj && b_nmaj && p.out == DType::kBFloat16 && p.bias == nullptr && !p.relu &&
      p.mask != nullptr && aligned(p.mask, 16) && p.mask_sn == 1 && mult16(p.mask_sm, 2) &&
      mult16(p.mask_sb, 2)) {
    return Sm90Family::kBackwardInput;
  }
  if (a_mmaj && b_nmaj && p.out == DType::kFloat32 && p.bias == nullptr && !p.relu &&
      p.mask == nullptr) {
    return Sm90Family::kBackwardWeight;
  }
  return Sm90Family::kNone;
#endif
}

#ifndef APM_FAST_HAVE_SM90_GEMM

size_t gemm_sm90_workspace_size(const GemmParams&, int) { return 0; }

cudaError_t gemm_sm90(const GemmParams&, int, void*, cudaStream_t) { return cudaErrorNotSupported; }

#else  // APM_FAST_HAVE_SM90_GEMM

namespace {

int element_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Runs (or, with workspace_size, sizes) every launch of `p`: one per batch when an operand is
// shared across the batch, else one.
cudaError_t dispatch(const GemmParams& p, int device, void* workspace, cudaStream_t stream,
                     size_t* workspace_size) {
  cudaError_t (*run)(const GemmParams&, int, void*, cudaStream_t, size_t*) = nullptr;
  switch (sm90_family(p)) {
    case Sm90Family::kForward: run = sm90::run_forward; break;
    case Sm90Family::kBackwardInput: run = sm90::run_backward_input; break;
    case Sm90Family::kBackwardWeight: run = sm90::run_backward_weight; break;
    default: return cudaErrorNotSupported;
  }
  const bool shared = p.batch > 1 && (p.a_sb == 0 || p.b_sb == 0 || p.d_sb == 0 ||
                                      (p.mask != nullptr && p.mask_sb == 0));
  if (!shared) return run(p, device, workspace, stream, workspace_size);
  const int ib = element_bytes(p.in), ob = element_bytes(p.out);
  size_t need = 0;
  for (int64_t i = 0; i < p.batch; ++i) {
    GemmParams q = p;
    q.batch = 1;
    q.a = static_cast<const char*>(p.a) + i * p.a_sb * ib;
    q.b = static_cast<const char*>(p.b) + i * p.b_sb * ib;
    q.d = static_cast<char*>(p.d) + i * p.d_sb * ob;
    if (p.bias) q.bias = static_cast<const char*>(p.bias) + i * p.bias_sb * ib;
    if (p.mask) q.mask = static_cast<const char*>(p.mask) + i * p.mask_sb * ib;
    size_t s = 0;
    cudaError_t e = run(q, device, workspace, stream, workspace_size ? &s : nullptr);
    if (e != cudaSuccess) return e;
    need = s > need ? s : need;
  }
  if (workspace_size != nullptr) *workspace_size = need;
  return cudaSuccess;
}

}  // namespace

size_t gemm_sm90_workspace_size(const GemmParams& p, int device) {
  size_t s = 0;
  if (dispatch(p, device, nullptr, nullptr, &s) != cudaSuccess) return 0;
  return s;
}

cudaError_t gemm_sm90(const GemmParams& p, int device, void* workspace, cudaStream_t stream) {
  return dispatch(p, device, workspace, stream, nullptr);
}

#endif  // APM_FAST_HAVE_SM90_GEMM

}  // namespace apm
