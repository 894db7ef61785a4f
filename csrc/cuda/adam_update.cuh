// One Adam update of one element: the coefficients of an update and its arithmetic, as the Adam
// kernels (adam.cu) apply them.
#pragma once

#include <cstdint>

namespace apm {

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

}  // namespace apm
