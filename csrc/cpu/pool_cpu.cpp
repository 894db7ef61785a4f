// Single-query attention pool on the CPU (spec section 3), at::parallel_for over images; the same
// algebra as csrc/cuda/pool.cu and TorchPrimitives.pool_fwd / pool_bwd, in f's accumulation dtype
// (double for double inputs, else float).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../torch/checks.h"
#include "cpu_ops.h"

namespace apm_cpu {

using namespace apm_glue;

namespace {

struct Shape {
  int64_t S, B, L, D, H;
};

Shape check_inputs(const char* fn, const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt) {
  check_cpu(f, fn, "f");
  check_dtype(f, fn, "f", {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf});
  check_contiguous(f, fn, "f");
  check_dim(f, fn, "f", "(S, B, L, D)", 4);
  const int64_t S = f.size(0), B = f.size(1), L = f.size(2), D = f.size(3);
  check_cpu(pos, fn, "pos_out");
  check_same_dtype(pos, f, fn, "pos_out", "f");
  check_shape(pos, fn, "pos_out", "(L, D)", {L, D});
  check_contiguous(pos, fn, "pos_out");
  check_cpu(kt, fn, "kt");
  check_dim(kt, fn, "kt", "(S, H, D)", 3);
  const int64_t H = kt.size(1);
  check_shape(kt, fn, "kt", "(S, H, D)", {S, H, D});
  check_contiguous(kt, fn, "kt");
  APM_CHECK_VALUE(L > 0, fn, ": the pool needs at least one cell (L > 0), got L = 0");
  return Shape{S, B, L, D, H};
}

void check_acc_tensor(const at::Tensor& t, at::ScalarType acc, const char* fn, const char* name,
                      const char* what, std::initializer_list<int64_t> dims) {
  check_cpu(t, fn, name);
  check_dtype(t, fn, name, {acc});
  check_shape(t, fn, name, what, dims);
  check_contiguous(t, fn, name);
}

// score[h][l] = scale kt_h . (f_l + pos_l) for one image.
template <typename T, typename A>
void image_scores(const T* f, const T* pos, const A* kt, A scale, const Shape& sh, A* score) {
  for (int64_t l = 0; l < sh.L; ++l) {
    for (int64_t h = 0; h < sh.H; ++h) {
      A acc = A(0);
      for (int64_t d = 0; d < sh.D; ++d)
        acc += (static_cast<A>(f[l * sh.D + d]) + static_cast<A>(pos[l * sh.D + d])) * kt[h * sh.D + d];
      score[h * sh.L + l] = acc * scale;
    }
  }
}

}  // namespace

void pool_fwd(const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt, double scale,
              const at::Tensor& sbar, const at::Tensor& lse) {
  const char* fn = "pool_fwd";
  const Shape sh = check_inputs(fn, f, pos, kt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pool_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    check_dtype(kt, fn, "kt", {acc});
    check_acc_tensor(sbar, acc, fn, "sbar", "(S, B, H, D)", {sh.S, sh.B, sh.H, sh.D});
    check_acc_tensor(lse, acc, fn, "lse", "(S, B, H)", {sh.S, sh.B, sh.H});
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const scalar_t* pp = pos.data_ptr<scalar_t>();
    const A* kp = kt.data_ptr<A>();
    A* sp = sbar.data_ptr<A>();
    A* lp = lse.data_ptr<A>();
    at::parallel_for(0, sh.S * sh.B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<A> score(sh.H * sh.L);
      for (int64_t sb = lo; sb < hi; ++sb) {
        const int64_t s = sb / sh.B;
        const scalar_t* fi = fp + sb * sh.L * sh.D;
        image_scores(fi, pp, kp + s * sh.H * sh.D, static_cast<A>(scale), sh, score.data());
        for (int64_t h = 0; h < sh.H; ++h) {
          const A* row = score.data() + h * sh.L;
          A m = -std::numeric_limits<A>::infinity();
          for (int64_t l = 0; l < sh.L; ++l) m = std::max(m, row[l]);
          A z = A(0);
          for (int64_t l = 0; l < sh.L; ++l) z += std::exp(row[l] - m);
          const A lse_h = m + std::log(z);
          lp[sb * sh.H + h] = lse_h;
          A* out = sp + (sb * sh.H + h) * sh.D;
          for (int64_t d = 0; d < sh.D; ++d) out[d] = A(0);
          for (int64_t l = 0; l < sh.L; ++l) {
            const A a = std::exp(row[l] - lse_h);
            for (int64_t d = 0; d < sh.D; ++d)
              out[d] += a * (static_cast<A>(fi[l * sh.D + d]) + static_cast<A>(pp[l * sh.D + d]));
          }
        }
      }
    });
  });
}

void pool_bwd(const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt, double scale,
              const at::Tensor& sbar, const at::Tensor& lse, const at::Tensor& dsbar,
              const at::Tensor& df, const at::Tensor& dkt) {
  const char* fn = "pool_bwd";
  const Shape sh = check_inputs(fn, f, pos, kt);
  check_cpu(df, fn, "df");
  check_dtype(df, fn, "df", {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf});
  check_shape(df, fn, "df", "(S, B, L, D)", {sh.S, sh.B, sh.L, sh.D});
  check_contiguous(df, fn, "df");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pool_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    check_dtype(kt, fn, "kt", {acc});
    check_acc_tensor(sbar, acc, fn, "sbar", "(S, B, H, D)", {sh.S, sh.B, sh.H, sh.D});
    check_acc_tensor(lse, acc, fn, "lse", "(S, B, H)", {sh.S, sh.B, sh.H});
    check_acc_tensor(dsbar, acc, fn, "dsbar", "(S, B, H, D)", {sh.S, sh.B, sh.H, sh.D});
    check_acc_tensor(dkt, acc, fn, "dkt", "(S, H, D)", {sh.S, sh.H, sh.D});
    const A sc = static_cast<A>(scale);
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const scalar_t* pp = pos.data_ptr<scalar_t>();
    const A* kp = kt.data_ptr<A>();
    const A* sbp = sbar.data_ptr<A>();
    const A* lp = lse.data_ptr<A>();
    const A* dsp = dsbar.data_ptr<A>();
    // df in the acc dtype (cast once at the end when df is narrower); per-image dkt terms summed
    // over images afterwards in a fixed order
    at::Tensor dfa = df.scalar_type() == acc ? df : at::empty(df.sizes(), dsbar.options());
    at::Tensor dkt_img = at::empty({sh.S, sh.B, sh.H, sh.D}, dsbar.options());
    A* dfp = dfa.data_ptr<A>();
    A* dkp = dkt_img.data_ptr<A>();
    at::parallel_for(0, sh.S * sh.B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<A> score(sh.H * sh.L), sd(sh.H);
      for (int64_t sb = lo; sb < hi; ++sb) {
        const int64_t s = sb / sh.B;
        const scalar_t* fi = fp + sb * sh.L * sh.D;
        const A* k = kp + s * sh.H * sh.D;
        const A* ds = dsp + sb * sh.H * sh.D;
        image_scores(fi, pp, k, sc, sh, score.data());
        for (int64_t h = 0; h < sh.H; ++h) {
          A acc_sd = A(0);
          for (int64_t d = 0; d < sh.D; ++d) acc_sd += sbp[(sb * sh.H + h) * sh.D + d] * ds[h * sh.D + d];
          sd[h] = acc_sd;
        }
        A* dk = dkp + sb * sh.H * sh.D;
        for (int64_t i = 0; i < sh.H * sh.D; ++i) dk[i] = A(0);
        for (int64_t l = 0; l < sh.L; ++l) {
          A* drow = dfp + (sb * sh.L + l) * sh.D;
          for (int64_t d = 0; d < sh.D; ++d) drow[d] = A(0);
          for (int64_t h = 0; h < sh.H; ++h) {
            const A a = std::exp(score[h * sh.L + l] - lp[sb * sh.H + h]);
            A dot = A(0);
            for (int64_t d = 0; d < sh.D; ++d)
              dot += (static_cast<A>(fi[l * sh.D + d]) + static_cast<A>(pp[l * sh.D + d])) * ds[h * sh.D + d];
            const A c = a * (dot - sd[h]);
            for (int64_t d = 0; d < sh.D; ++d) {
              const A kv = static_cast<A>(fi[l * sh.D + d]) + static_cast<A>(pp[l * sh.D + d]);
              drow[d] += a * ds[h * sh.D + d] + sc * c * k[h * sh.D + d];
              dk[h * sh.D + d] += sc * c * kv;
            }
          }
        }
      }
    });
    A* out = dkt.data_ptr<A>();
    at::parallel_for(0, sh.S * sh.H * sh.D, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t s = i / (sh.H * sh.D), hd = i % (sh.H * sh.D);
        A acc_v = A(0);
        for (int64_t b = 0; b < sh.B; ++b) acc_v += dkp[(s * sh.B + b) * sh.H * sh.D + hd];
        out[i] = acc_v;
      }
    });
    if (!dfa.is_same(df)) df.copy_(dfa);
  });
}

}  // namespace apm_cpu
