// Trigger split of the first layer on the CPU (spec section 3), at::parallel_for over rows:
//   u = W_T T + b1                      (one H-vector per image)
//   a[b*L + l] = ReLU(P_l + u_b)        (the first layer's activation, where it must exist)
//   g1 = g * (P_l + u_b > 0), r_b = sum_l g1[b*L + l]   (its backward: mask and per-image sum)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "../torch/checks.h"
#include "cpu_ops.h"

namespace apm_cpu {

using namespace apm_glue;

namespace {

void check_float_cpu(const at::Tensor& t, const char* fn, const char* name) {
  check_cpu(t, fn, name);
  check_dtype(t, fn, name, {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf});
  check_contiguous(t, fn, name);
}

}  // namespace

// u[s, b, h] = sum_{k < d} t[s, b, k] w1[s, h, k] + b1[s, h], d = t's last size, w1 (S, H, >= d).
void trigger_u(const at::Tensor& t, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& u) {
  const char* fn = "trigger_u";
  check_cpu(t, fn, "t");
  check_dtype(t, fn, "t", {at::kDouble, at::kFloat});
  check_contiguous(t, fn, "t");
  check_dim(t, fn, "t", "(S, B, d)", 3);
  const int64_t S = t.size(0), B = t.size(1), d = t.size(2);
  for (const auto& x : {std::make_pair(&w1, "w1"), std::make_pair(&b1, "b1"), std::make_pair(&u, "u")}) {
    check_cpu(*x.first, fn, x.second);
    check_same_dtype(*x.first, t, fn, x.second, "t");
    check_contiguous(*x.first, fn, x.second);
  }
  check_dim(w1, fn, "w1", "(S, H, d_total)", 3);
  const int64_t H = w1.size(1), dt = w1.size(2);
  APM_CHECK_VALUE(w1.size(0) == S && dt >= d, fn, ": w1 must be (S, H, d_total) with S = ", S,
                    " and d_total >= d = ", d, ", got ", sizes_str(w1));
  check_shape(b1, fn, "b1", "(S, H)", {S, H});
  check_shape(u, fn, "u", "(S, B, H)", {S, B, H});
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "trigger_u", [&] {
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* wp = w1.data_ptr<scalar_t>();
    const scalar_t* bp = b1.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    at::parallel_for(0, S * B * H, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t h = i % H, sb = i / H, s = sb / B;
        const scalar_t* trow = tp + sb * d;
        const scalar_t* wrow = wp + (s * H + h) * dt;
        scalar_t acc = bp[s * H + h];
        for (int64_t k = 0; k < d; ++k) acc += trow[k] * wrow[k];
        up[i] = acc;
      }
    });
  });
}

// a[s, b*L + l, h] = ReLU(p[s, l, h] + u[s, b, h]) in p's dtype; u in p's accumulation dtype.
void first_layer_act(const at::Tensor& p, const at::Tensor& u, const at::Tensor& a) {
  const char* fn = "first_layer_act";
  check_float_cpu(p, fn, "p");
  check_float_cpu(u, fn, "u");
  check_float_cpu(a, fn, "a");
  check_dim(p, fn, "p", "(S, L, H)", 3);
  check_dim(u, fn, "u", "(S, B, H)", 3);
  const int64_t S = p.size(0), L = p.size(1), H = p.size(2), B = u.size(1);
  check_shape(u, fn, "u", "(S, B, H)", {S, B, H});
  check_shape(a, fn, "a", "(S, B*L, H)", {S, B * L, H});
  check_same_dtype(a, p, fn, "a", "p");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "first_layer_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    check_dtype(u, fn, "u", {c10::CppTypeToScalarType<acc_t>::value});
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const acc_t* uu = u.data_ptr<acc_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    at::parallel_for(0, S * B * L, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t l = row % L, sb = row / L, s = sb / B;
        const scalar_t* prow = pp + (s * L + l) * H;
        const acc_t* urow = uu + sb * H;
        scalar_t* arow = ap + row * H;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t v = static_cast<acc_t>(prow[h]) + urow[h];
          arow[h] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
        }
      }
    });
  });
}

// g1 = g * (p[l] + u[b] > 0) (any float dtype), r[s, b] = sum_l g1 before rounding (acc dtype).
// g (S, B*L, H) and u (S, B, H) in p's accumulation dtype; p (S, L, H).
void first_layer_mask_sum(const at::Tensor& g, const at::Tensor& p, const at::Tensor& u,
                          const at::Tensor& g1, const at::Tensor& r) {
  const char* fn = "first_layer_mask_sum";
  check_float_cpu(g, fn, "g");
  check_float_cpu(p, fn, "p");
  check_float_cpu(u, fn, "u");
  check_float_cpu(g1, fn, "g1");
  check_float_cpu(r, fn, "r");
  check_dim(p, fn, "p", "(S, L, H)", 3);
  check_dim(u, fn, "u", "(S, B, H)", 3);
  const int64_t S = p.size(0), L = p.size(1), H = p.size(2), B = u.size(1);
  check_shape(u, fn, "u", "(S, B, H)", {S, B, H});
  check_shape(g, fn, "g", "(S, B*L, H)", {S, B * L, H});
  check_shape(g1, fn, "g1", "(S, B*L, H)", {S, B * L, H});
  check_shape(r, fn, "r", "(S, B, H)", {S, B, H});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "first_layer_mask_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    check_dtype(g, fn, "g", {acc_type});
    check_dtype(u, fn, "u", {acc_type});
    check_dtype(r, fn, "r", {acc_type});
    // the masked gradient in the acc dtype, cast once into g1's dtype at the end
    at::Tensor masked = g1.scalar_type() == acc_type ? g1 : at::empty_like(g);
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const acc_t* uu = u.data_ptr<acc_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    acc_t* mp = masked.data_ptr<acc_t>();
    acc_t* rp = r.data_ptr<acc_t>();
    // one task per (image, column block): rows of the image summed in order (deterministic)
    const int64_t hb = 64, nhb = (H + hb - 1) / hb;
    at::parallel_for(0, S * B * nhb, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t sb = task / nhb, h0 = (task % nhb) * hb, h1 = std::min(H, h0 + hb);
        const int64_t s = sb / B;
        acc_t* rrow = rp + sb * H;
        for (int64_t h = h0; h < h1; ++h) rrow[h] = acc_t(0);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t row = sb * L + l;
          const scalar_t* prow = pp + (s * L + l) * H;
          const acc_t* urow = uu + sb * H;
          for (int64_t h = h0; h < h1; ++h) {
            const acc_t pre = static_cast<acc_t>(prow[h]) + urow[h];
            const acc_t v = pre > acc_t(0) ? gp[row * H + h] : acc_t(0);
            mp[row * H + h] = v;
            rrow[h] += v;
          }
        }
      }
    });
    if (!masked.is_same(g1)) g1.copy_(masked);
  });
}

}  // namespace apm_cpu
