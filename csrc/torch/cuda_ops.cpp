// Torch bindings of the non-GEMM CUDA primitives: the first-layer activation of the trigger split,
// the single-query pool (forward, backward), the flat Adam update and the reset's broadcast.
// Outputs are passed in and written completely; scratch buffers come from PyTorch's caching
// allocator (capture-safe).
#include <cmath>
#include <vector>

#include "cuda_common.h"

namespace apm_glue {

namespace {

// The pool's shared argument checks; returns its shape.
apm::PoolShape check_pool_inputs(const char* fn, const at::Tensor& f, const at::Tensor& pos,
                                 const at::Tensor& kt) {
  check_cuda(f, fn, "f");
  check_dim(f, fn, "f", "(S, B, L, D)", 4);
  to_apm_dtype(f, fn, "f");
  check_contiguous(f, fn, "f");
  const int64_t S = f.size(0), B = f.size(1), L = f.size(2), D = f.size(3);
  check_same_device(pos, f, fn, "pos_out", "f");
  check_same_dtype(pos, f, fn, "pos_out", "f");
  check_shape(pos, fn, "pos_out", "(L, D)", {L, D});
  check_contiguous(pos, fn, "pos_out");
  check_same_device(kt, f, fn, "kt", "f");
  check_dtype(kt, fn, "kt", {at::kFloat});
  check_dim(kt, fn, "kt", "(S, H, D)", 3);
  const int64_t H = kt.size(1);
  check_shape(kt, fn, "kt", "(S, H, D)", {S, H, D});
  check_contiguous(kt, fn, "kt");
  APM_CHECK_VALUE(H >= 1 && H <= apm::kPoolMaxHeads, fn, ": the CUDA pool supports 1 to ",
                    apm::kPoolMaxHeads, " heads, got H = ", H);
  APM_CHECK_VALUE(D <= apm::kPoolMaxWidth, fn, ": the CUDA pool supports a feature width D of at most ",
                  apm::kPoolMaxWidth, ", got D = ", D, " (backend='triton' or 'torch' take any D)");
  return apm::PoolShape{S, B, L, D, H};
}

void check_f32_out(const at::Tensor& t, const at::Tensor& like, const char* fn, const char* name,
                   const char* what, std::initializer_list<int64_t> dims) {
  check_same_device(t, like, fn, name, "f");
  check_dtype(t, fn, name, {at::kFloat});
  check_shape(t, fn, name, what, dims);
  check_contiguous(t, fn, name);
}

bool empty_pool(const apm::PoolShape& sh) { return sh.S == 0 || sh.B == 0 || sh.L == 0 || sh.D == 0; }

}  // namespace

// a[s, b*L + l] = ReLU(p[s, l] + u[s, b]); p (S, L, H), u (S, B, H) fp32, a (S, B*L, H) p's dtype.
// With width > 0: p holds Q (S, width + height, H) fp32 (the position code's separable form), P[y *
// width + x] = Q[x] + Q[width + y] (L = height * width), and a may be any compute dtype.
void first_layer_act(const at::Tensor& p, const at::Tensor& u, const at::Tensor& a, int64_t height,
                     int64_t width) {
  const char* fn = "first_layer_act";
  check_cuda(p, fn, "p");
  check_dim(p, fn, "p", "(S, L, H)", 3);
  const bool halves = width > 0;
  APM_CHECK_VALUE(halves == (height > 0), fn, ": height and width are both positive (Q given) or both 0, got ",
                  height, " and ", width);
  check_same_device(u, p, fn, "u", "p");
  check_dtype(u, fn, "u", {at::kFloat});
  check_dim(u, fn, "u", "(S, B, H)", 3);
  const int64_t S = p.size(0), H = p.size(2), B = u.size(1);
  const int64_t L = halves ? height * width : p.size(1);
  if (halves) {
    check_dtype(p, fn, "p (Q)", {at::kFloat});
    check_shape(p, fn, "p (Q)", "(S, width + height, H)", {S, width + height, H});
  }
  check_shape(u, fn, "u", "(S, B, H)", {S, B, H});
  check_same_device(a, p, fn, "a", "p");
  if (!halves) check_same_dtype(a, p, fn, "a", "p");
  const apm::DType t = to_apm_dtype(halves ? a : p, fn, halves ? "a" : "p");
  check_shape(a, fn, "a", "(S, B*L, H)", {S, B * L, H});
  for (const at::Tensor* x : {&p, &u, &a}) check_contiguous(*x, fn, "p, u and a");
  if (S * B * L * H == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(p.device());
  if (halves) {
    check_cuda_status(apm::first_layer_act_halves(p.data_ptr<float>(), u.data_ptr<float>(), a.data_ptr(), t, S, B,
                                                  height, width, H, current_stream(p)),
                      fn, "the kernel launch");
    return;
  }
  check_cuda_status(apm::first_layer_act(p.data_ptr(), u.data_ptr<float>(), a.data_ptr(), t, S, B, L,
                                         H, current_stream(p)),
                    fn, "the kernel launch");
}

// sbar (S, B, H, D) fp32, lse (S, B, H) fp32; see TorchPrimitives.pool_fwd.
void pool_fwd(const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt, double scale,
              const at::Tensor& sbar, const at::Tensor& lse) {
  const char* fn = "pool_fwd";
  const apm::PoolShape sh = check_pool_inputs(fn, f, pos, kt);
  APM_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  check_f32_out(sbar, f, fn, "sbar", "(S, B, H, D)", {sh.S, sh.B, sh.H, sh.D});
  check_f32_out(lse, f, fn, "lse", "(S, B, H)", {sh.S, sh.B, sh.H});
  if (sh.S == 0 || sh.B == 0) return;
  APM_CHECK_VALUE(sh.L > 0, fn, ": the pool needs at least one cell (L > 0), got L = 0");
  if (sh.D == 0) {
    sbar.zero_();
    lse.fill_(std::log(static_cast<double>(sh.L)));  // every score is 0
    return;
  }
  const c10::cuda::OptionalCUDAGuard guard(f.device());
  const int rows = apm::pool_tile_rows(sh, apm::device_sm_count(f.get_device()));
  const int64_t tiles = apm::pool_tiles(sh, rows);
  at::Tensor part_m = at::empty({sh.S * sh.B, tiles, sh.H}, kt.options());
  at::Tensor part_s = at::empty({sh.S * sh.B, tiles, sh.H}, kt.options());
  at::Tensor part_acc = at::empty({sh.S * sh.B, tiles, sh.H, sh.D}, kt.options());
  check_cuda_status(apm::pool_fwd(f.data_ptr(), pos.data_ptr(), to_apm_dtype(f, fn, "f"),
                                  kt.data_ptr<float>(), static_cast<float>(scale), sh, rows,
                                  part_m.data_ptr<float>(), part_s.data_ptr<float>(),
                                  part_acc.data_ptr<float>(), sbar.data_ptr<float>(),
                                  lse.data_ptr<float>(), current_stream(f)),
                    fn, "the pool kernels");
}

// df (S, B, L, D) in any of the three dtypes, dkt (S, H, D) fp32; see TorchPrimitives.pool_bwd.
void pool_bwd(const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt, double scale,
              const at::Tensor& sbar, const at::Tensor& lse, const at::Tensor& dsbar,
              const at::Tensor& df, const at::Tensor& dkt) {
  const char* fn = "pool_bwd";
  const apm::PoolShape sh = check_pool_inputs(fn, f, pos, kt);
  APM_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  check_f32_out(sbar, f, fn, "sbar", "(S, B, H, D)", {sh.S, sh.B, sh.H, sh.D});
  check_f32_out(lse, f, fn, "lse", "(S, B, H)", {sh.S, sh.B, sh.H});
  check_f32_out(dsbar, f, fn, "dsbar", "(S, B, H, D)", {sh.S, sh.B, sh.H, sh.D});
  check_same_device(df, f, fn, "df", "f");
  const apm::DType df_t = to_apm_dtype(df, fn, "df");
  APM_CHECK_VALUE(df.scalar_type() == f.scalar_type() || df.scalar_type() == at::kFloat, fn,
                  ": df must have f's dtype (", f.scalar_type(), ") or float32, got ", df.scalar_type());
  check_shape(df, fn, "df", "(S, B, L, D)", {sh.S, sh.B, sh.L, sh.D});
  check_contiguous(df, fn, "df");
  check_f32_out(dkt, f, fn, "dkt", "(S, H, D)", {sh.S, sh.H, sh.D});
  if (sh.S == 0) return;
  if (empty_pool(sh)) {
    df.zero_();
    dkt.zero_();
    return;
  }
  const c10::cuda::OptionalCUDAGuard guard(f.device());
  const int rows = apm::pool_tile_rows(sh, apm::device_sm_count(f.get_device()));
  at::Tensor partial = at::empty({sh.S * sh.B, apm::pool_tiles(sh, rows), sh.H, sh.D}, kt.options());
  check_cuda_status(
      apm::pool_bwd(f.data_ptr(), pos.data_ptr(), to_apm_dtype(f, fn, "f"), kt.data_ptr<float>(),
                    static_cast<float>(scale), sh, sbar.data_ptr<float>(), lse.data_ptr<float>(),
                    dsbar.data_ptr<float>(), df.data_ptr(), df_t, dkt.data_ptr<float>(), rows,
                    partial.data_ptr<float>(), current_stream(f)),
      fn, "the pool backward kernels");
}

namespace {

// The row stride of t seen as rows of its last dimension (unit stride), every row the same
// stride apart: a flat buffer, (S, n) rows of a padded one, or an (S, R, C) block of a weight's
// columns (student stride = R row strides); refused otherwise, by name.
int64_t row_stride(const at::Tensor& t, const char* fn, const char* name) {
  check_rows_contiguous(t, fn, name);
  if (t.dim() < 2) return t.numel();
  for (int64_t d = 0; d + 2 < t.dim(); ++d) {
    APM_CHECK_VALUE(t.size(d) == 1 || t.stride(d) == t.size(d + 1) * t.stride(d + 1), fn, ": ", name,
                    " must be rows one stride apart (a flat buffer or a block of columns of one), got shape ",
                    sizes_str(t), " and strides ", strides_str(t));
  }
  return t.size(-2) == 1 ? t.size(-1) : t.stride(-2);
}

}  // namespace

// One Adam step, in place: params, grads, exp_avg, exp_avg_sq (and lowp) of one shape, each rows
// of its last dimension one row stride apart (flat buffers, or (S, R, C) blocks of a weight's
// columns); step and lr are one-element fp32 device tensors; lowp (optional) receives the new
// parameters. grads may be None when outer_a (S, K, R) and outer_b (S, K, C) (fp32, params
// (S, R, C)) give the gradient by its factors, sum_k outer_a[:, k]^T outer_b[:, k].
void adam_(const at::Tensor& params, const c10::optional<at::Tensor>& grads, const at::Tensor& exp_avg,
           const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& lr, double beta1,
           double beta2, double eps, const c10::optional<at::Tensor>& lowp,
           const c10::optional<at::Tensor>& outer_a, const c10::optional<at::Tensor>& outer_b) {
  const char* fn = "adam_";
  check_cuda(params, fn, "params");
  const bool has_g = grads.has_value() && grads->defined();
  const bool has_outer = outer_a.has_value() && outer_a->defined() && outer_b.has_value() && outer_b->defined();
  APM_CHECK_VALUE(has_g != has_outer, fn, ": expected exactly one of grads and (outer_a, outer_b), got ",
                  has_g ? "both" : "neither");
  std::vector<std::pair<const at::Tensor*, const char*>> bufs = {
      {&params, "params"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  if (has_g) bufs.emplace_back(&*grads, "grads");
  for (const auto& b : bufs) {
    check_same_device(*b.first, params, fn, b.second, "params");
    if (b.first == &exp_avg || b.first == &exp_avg_sq) {   // the moments: fp32 or bf16, alike
      check_dtype(*b.first, fn, b.second, {at::kFloat, at::kBFloat16});
      APM_CHECK_VALUE(b.first->scalar_type() == exp_avg.scalar_type(), fn, ": exp_avg_sq must have ",
                      "exp_avg's dtype (", exp_avg.scalar_type(), "), got ", b.first->scalar_type());
    } else {
      check_dtype(*b.first, fn, b.second, {at::kFloat});
    }
    APM_CHECK_VALUE(b.first->sizes() == params.sizes(), fn, ": ", b.second, " must have params' shape ",
                    sizes_str(params), ", got ", sizes_str(*b.first));
  }
  for (const auto& b : {std::make_pair(&step, "step"), std::make_pair(&lr, "lr")}) {
    check_same_device(*b.first, params, fn, b.second, "params");
    check_dtype(*b.first, fn, b.second, {at::kFloat});
    check_numel_one(*b.first, fn, b.second);
  }
  APM_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, fn, ": beta1 must be in [0, 1), got ", beta1);
  APM_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, fn, ": beta2 must be in [0, 1), got ", beta2);
  APM_CHECK_VALUE(eps > 0.0, fn, ": eps must be positive, got ", eps);
  apm::AdamBuffers b{};
  b.params = params.data_ptr<float>();
  b.ld_p = row_stride(params, fn, "params");
  b.exp_avg = exp_avg.data_ptr();
  b.ld_m = row_stride(exp_avg, fn, "exp_avg");
  b.exp_avg_sq = exp_avg_sq.data_ptr();
  b.ld_v = row_stride(exp_avg_sq, fn, "exp_avg_sq");
  b.moment_t = to_apm_dtype(exp_avg, fn, "exp_avg");
  b.lowp_t = apm::DType::kFloat32;
  if (lowp.has_value() && lowp->defined()) {
    check_same_device(*lowp, params, fn, "lowp", "params");
    APM_CHECK_VALUE(lowp->sizes() == params.sizes(), fn, ": lowp must have params' shape ", sizes_str(params),
                    ", got ", sizes_str(*lowp));
    b.lowp_t = to_apm_dtype(*lowp, fn, "lowp");
    b.lowp = lowp->data_ptr();
    b.ld_l = row_stride(*lowp, fn, "lowp");
  }
  if (has_g) {
    b.grads = grads->data_ptr<float>();
    b.ld_g = row_stride(*grads, fn, "grads");
  } else {
    check_dim(params, fn, "params", "(S, R, C) with the gradient's factors", 3);
    const at::Tensor& a = *outer_a;
    const at::Tensor& f = *outer_b;
    for (const auto& t : {std::make_pair(&a, "outer_a"), std::make_pair(&f, "outer_b")}) {
      check_same_device(*t.first, params, fn, t.second, "params");
      check_dtype(*t.first, fn, t.second, {at::kFloat});
      check_dim(*t.first, fn, t.second, "(S, K, R) / (S, K, C)", 3);
      check_rows_contiguous(*t.first, fn, t.second);
    }
    APM_CHECK_VALUE(a.size(0) == params.size(0) && a.size(2) == params.size(1), fn, ": outer_a must have shape (",
                    params.size(0), ", K, ", params.size(1), "), got ", sizes_str(a));
    APM_CHECK_VALUE(f.size(0) == params.size(0) && f.size(1) == a.size(1) && f.size(2) == params.size(2), fn,
                    ": outer_b must have shape (", params.size(0), ", ", a.size(1), ", ", params.size(2), "), got ",
                    sizes_str(f));
    b.a = a.data_ptr<float>();
    b.b = f.data_ptr<float>();
    b.a_s = a.stride(0);
    b.a_k = a.stride(1);
    b.b_s = f.stride(0);
    b.b_k = f.stride(1);
    b.rows_per_student = params.size(1);
    b.k = static_cast<int>(a.size(1));
  }
  if (params.numel() == 0) return;
  const int64_t cols = params.dim() == 0 ? 1 : params.size(-1);
  const c10::cuda::OptionalCUDAGuard guard(params.device());
  check_cuda_status(apm::adam(b, params.numel() / cols, cols, step.data_ptr<float>(), lr.data_ptr<float>(), beta1,
                              beta2, eps, current_stream(params)),
                    fn, "the kernel launch");
}

// dst[s] = src for every s (and lowp[s] = src in lowp's dtype, rounded to nearest even, when
// given): the reset of S students' weights to one snapshot. dst (S, *src.shape) fp32 contiguous,
// src fp32 contiguous, lowp dst's shape, contiguous, any of the three float dtypes.
void broadcast_(const at::Tensor& dst, const at::Tensor& src, const c10::optional<at::Tensor>& lowp) {
  const char* fn = "broadcast_";
  check_cuda(dst, fn, "dst");
  check_dtype(dst, fn, "dst", {at::kFloat});
  APM_CHECK_VALUE(dst.dim() >= 1, fn, ": dst must be (S, *shape), got a 0-d tensor");
  check_contiguous(dst, fn, "dst");
  check_same_device(src, dst, fn, "src", "dst");
  check_dtype(src, fn, "src", {at::kFloat});
  check_contiguous(src, fn, "src");
  APM_CHECK_VALUE(src.sizes() == dst.sizes().slice(1), fn,
                  ": src must have dst's shape without its first dimension ", ints_str(dst.sizes().slice(1)),
                  ", got ", sizes_str(src));
  apm::DType lowp_t = apm::DType::kFloat32;
  void* lowp_ptr = nullptr;
  if (lowp.has_value() && lowp->defined()) {
    check_same_device(*lowp, dst, fn, "lowp", "dst");
    APM_CHECK_VALUE(lowp->sizes() == dst.sizes(), fn, ": lowp must have dst's shape ", sizes_str(dst), ", got ",
                    sizes_str(*lowp));
    check_contiguous(*lowp, fn, "lowp");
    lowp_t = to_apm_dtype(*lowp, fn, "lowp");
    lowp_ptr = lowp->data_ptr();
  }
  if (dst.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(dst.device());
  check_cuda_status(apm::broadcast(dst.data_ptr<float>(), src.data_ptr<float>(), lowp_ptr, lowp_t, src.numel(),
                                   dst.size(0), current_stream(dst)),
                    fn, "the kernel launch");
}

}  // namespace apm_glue
