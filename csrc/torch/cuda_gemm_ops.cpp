// Torch bindings of the GEMM primitives (see apm_fast/ops/primitives.py for their meaning): input
// checks, output checks, the split-K plan of the weight gradient, and the SM90/portable choice.
// Outputs are passed in (the Python layer allocates them) and written completely.
#include <atomic>

#include <ATen/ops/bmm.h>

#include "cuda_common.h"

namespace apm_glue {

namespace {

std::atomic<int> g_policy{0};
std::atomic<long long> g_sm90_launches{0};
std::atomic<long long> g_portable_launches{0};
std::atomic<long long> g_cublas_launches{0};

// A (S, M, K) or shared (M, K) operand: its batch stride (0 when shared) and row stride.
int64_t batch_stride(const at::Tensor& t) { return t.dim() == 3 ? t.stride(0) : 0; }

void check_gemm_operand(const at::Tensor& t, const char* fn, const char* name) {
  check_cuda(t, fn, name);
  to_apm_dtype(t, fn, name);
  check_rows_contiguous(t, fn, name);
}

}  // namespace

int gemm_policy() { return g_policy.load(); }

void set_gemm_policy(int policy) {
  APM_CHECK_VALUE(policy >= 0 && policy <= 2, "set_gemm_policy: expected 0 (auto), 1 (portable)",
                    " or 2 (sm90), got ", policy);
  g_policy.store(policy);
}

void count_gemm(bool sm90) { (sm90 ? g_sm90_launches : g_portable_launches).fetch_add(1); }

std::vector<long long> gemm_counts() {
  return {g_sm90_launches.load(), g_portable_launches.load(), g_cublas_launches.load()};
}

void reset_gemm_counts() {
  g_sm90_launches.store(0);
  g_portable_launches.store(0);
  g_cublas_launches.store(0);
}

bool sm90_available(const at::Tensor& like) {
  check_cuda(like, "sm90_available", "like");
  return apm::sm90_device_ok(like.get_device());
}

void run_gemm(const apm::GemmParams& p, const at::Tensor& like, const char* fn) {
  const int dev = like.get_device();
  const cudaStream_t stream = current_stream(like);
  const int policy = gemm_policy();
  const bool sm90_ok = apm::sm90_device_ok(dev) && apm::sm90_family(p) != apm::Sm90Family::kNone;
  if (policy != 1 && sm90_ok) {
    const size_t ws_bytes = apm::gemm_sm90_workspace_size(p, dev);
    at::Tensor ws;
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, like.options().dtype(at::kByte));
    const cudaError_t e = apm::gemm_sm90(p, dev, ws_bytes > 0 ? ws.data_ptr() : nullptr, stream);
    if (e == cudaSuccess) {
      count_gemm(true);
      return;
    }
    if (e != cudaErrorNotSupported) check_cuda_status(e, fn, "the SM90 GEMM launch");
    // CUTLASS's can_implement refused: fall through to the portable kernel
    APM_CHECK(policy != 2, fn, ": the SM90 GEMM path was forced (set_gemm_policy(2)) but "
                "CUTLASS refused the problem m=", p.m, " n=", p.n, " k=", p.k, " batch=", p.batch);
  } else {
    APM_CHECK(policy != 2, fn, ": the SM90 GEMM path was forced (set_gemm_policy(2)) but it does "
                "not apply here (needs an sm_90a build, a compute capability 9.0 GPU, bf16 "
                "operands, 16-byte aligned rows and a supported layout); m=", p.m, " n=", p.n,
                " k=", p.k, " in=", apm::dtype_name(p.in), " out=", apm::dtype_name(p.out));
  }
  check_cuda_status(apm::gemm_portable(p, stream), fn, "the portable GEMM launch");
  count_gemm(false);
}

// out = act(x w^T + bias); x (S, M, K) or shared (M, K); w (S, N, K); bias (S, N); out (S, M, N).
void linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
            bool relu, const at::Tensor& out) {
  const char* fn = "linear";
  check_gemm_operand(x, fn, "x");
  check_gemm_operand(w, fn, "w");
  check_dim(w, fn, "w", "(S, N, K)", 3);
  check_same_device(x, w, fn, "x", "w");
  check_same_dtype(x, w, fn, "x", "w");
  APM_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, fn, ": x must be (S, M, K) or shared (M, K), got ",
                    "shape ", sizes_str(x));
  const int64_t S = w.size(0), N = w.size(1), K = w.size(2);
  const int64_t M = x.size(-2);
  APM_CHECK_VALUE(x.size(-1) == K, fn, ": x's last dimension must be K = ", K,
                    " (w's last), got x ", sizes_str(x), " and w ", sizes_str(w));
  if (x.dim() == 3) check_shape(x, fn, "x", "(S, M, K)", {S, M, K});
  check_positive(K, fn, "K (the contraction size)");
  check_cuda(out, fn, "out");
  check_same_device(out, w, fn, "out", "w");
  to_apm_dtype(out, fn, "out");
  check_shape(out, fn, "out", "(S, M, N)", {S, M, N});
  check_contiguous(out, fn, "out");
  apm::GemmParams p;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    check_cuda(b, fn, "bias");
    check_same_device(b, w, fn, "bias", "w");
    check_same_dtype(b, w, fn, "bias", "w");
    check_shape(b, fn, "bias", "(S, N)", {S, N});
    check_contiguous(b, fn, "bias");
    p.bias = b.data_ptr();
    p.bias_sb = b.stride(0);
  }
  if (S == 0 || M == 0 || N == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(w.device());
  if (gemm_policy() == 0 && w.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kFloat &&
      p.bias == nullptr && !relu && apm::sm90_device_ok(w.get_device())) {
    // An fp32 product without an epilogue (the position code's Q = C W_P^T from its halves):
    // the SM90 forward kernels write 16-bit outputs only, and the portable kernel is a fraction
    // of cuBLAS's rate, so cuBLAS (a shared x as a batch stride of 0). Forced paths keep ours.
    at::Tensor o = out;
    at::bmm_out(o, x.dim() == 2 ? x.expand({S, M, K}) : x, w.transpose(1, 2), at::kFloat);
    g_cublas_launches.fetch_add(1);
    return;
  }
  p.batch = S; p.m = M; p.n = N; p.k = K;
  p.a = x.data_ptr(); p.a_sb = batch_stride(x); p.a_sm = x.stride(-2); p.a_sk = 1;
  p.b = w.data_ptr(); p.b_sb = w.stride(0); p.b_sn = w.stride(1); p.b_sk = 1;
  p.d = out.data_ptr(); p.d_sb = out.stride(0); p.d_sm = out.stride(1); p.d_sn = 1;
  p.relu = relu;
  p.in = to_apm_dtype(w, fn, "w");
  p.out = to_apm_dtype(out, fn, "out");
  run_gemm(p, w, fn);
}

// out = (dy w) * (mask > 0 if mask); dy (S, M, N); w (S, N, K); mask, out (S, M, K).
void linear_bwd_input(const at::Tensor& dy, const at::Tensor& w,
                      const c10::optional<at::Tensor>& mask, const at::Tensor& out) {
  const char* fn = "linear_bwd_input";
  check_gemm_operand(dy, fn, "dy");
  check_gemm_operand(w, fn, "w");
  check_dim(w, fn, "w", "(S, N, K)", 3);
  check_dim(dy, fn, "dy", "(S, M, N)", 3);
  check_same_device(dy, w, fn, "dy", "w");
  check_same_dtype(dy, w, fn, "dy", "w");
  const int64_t S = w.size(0), N = w.size(1), K = w.size(2), M = dy.size(1);
  check_shape(dy, fn, "dy", "(S, M, N)", {S, M, N});
  check_positive(N, fn, "N (the contraction size)");
  check_cuda(out, fn, "out");
  check_same_device(out, w, fn, "out", "w");
  to_apm_dtype(out, fn, "out");
  check_shape(out, fn, "out", "(S, M, K)", {S, M, K});
  check_contiguous(out, fn, "out");
  apm::GemmParams p;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& mk = *mask;
    check_cuda(mk, fn, "mask");
    check_same_device(mk, w, fn, "mask", "w");
    check_same_dtype(mk, w, fn, "mask", "w");
    check_shape(mk, fn, "mask", "(S, M, K)", {S, M, K});
    check_rows_contiguous(mk, fn, "mask");
    p.mask = mk.data_ptr();
    p.mask_sb = mk.stride(0); p.mask_sm = mk.stride(1); p.mask_sn = 1;
  }
  if (S == 0 || M == 0 || K == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(w.device());
  p.batch = S; p.m = M; p.n = K; p.k = N;
  p.a = dy.data_ptr(); p.a_sb = dy.stride(0); p.a_sm = dy.stride(1); p.a_sk = 1;
  // B(j, k) = w[k, j]: unit stride along j
  p.b = w.data_ptr(); p.b_sb = w.stride(0); p.b_sn = 1; p.b_sk = w.stride(1);
  p.d = out.data_ptr(); p.d_sb = out.stride(0); p.d_sm = out.stride(1); p.d_sn = 1;
  p.in = to_apm_dtype(w, fn, "w");
  p.out = to_apm_dtype(out, fn, "out");
  run_gemm(p, w, fn);
}

namespace {

// Split-K plan for dw = dy^T x: how many slices of the M rows to compute as separate batches
// (then summed), so that a small weight (e.g. the head's 768 x 1024 = 48 tiles) still fills the
// GPU. Picks the split (dividing M, slices of >= 512 rows, at most 16) whose tile count fills the
// last wave best; 1 when the output alone has enough tiles.
int plan_splits(int64_t S, int64_t M, int64_t N, int64_t K, int sms) {
  const int64_t tiles = S * ((N + 127) / 128) * ((K + 127) / 128);
  if (tiles >= sms) return 1;
  int best = 1;
  double best_eff = static_cast<double>(tiles) / sms;  // one partial wave
  for (int s = 2; s <= 16; ++s) {
    if (M % s != 0 || M / s < 512) continue;
    const int64_t t = tiles * s;
    const int64_t waves = (t + sms - 1) / sms;
    const double eff = static_cast<double>(t) / static_cast<double>(waves * sms);
    if (eff > best_eff + 1e-9) {
      best = s;
      best_eff = eff;
    }
  }
  return best;
}

}  // namespace

// dw = sum_m dy[m]^T x[m] (fp32), db = sum_m dy[m] (fp32, optional).
// dy (S, M, N); x (S, M, K) or shared (M, K); dw (S, N, K) with unit-stride rows (e.g. the
// position columns of the first layer's gradient, written in place); db (S, N) contiguous.
void linear_bwd_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw,
                       const c10::optional<at::Tensor>& db) {
  const char* fn = "linear_bwd_weight";
  check_gemm_operand(dy, fn, "dy");
  check_gemm_operand(x, fn, "x");
  check_dim(dy, fn, "dy", "(S, M, N)", 3);
  check_same_device(x, dy, fn, "x", "dy");
  check_same_dtype(x, dy, fn, "x", "dy");
  APM_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, fn, ": x must be (S, M, K) or shared (M, K), got ",
                    "shape ", sizes_str(x));
  const int64_t S = dy.size(0), M = dy.size(1), N = dy.size(2), K = x.size(-1);
  if (x.dim() == 3) check_shape(x, fn, "x", "(S, M, K)", {S, M, K});
  else check_shape(x, fn, "x", "(M, K)", {M, K});
  check_cuda(dw, fn, "dw");
  check_same_device(dw, dy, fn, "dw", "dy");
  check_dtype(dw, fn, "dw", {at::kFloat});
  check_shape(dw, fn, "dw", "(S, N, K)", {S, N, K});
  check_rows_contiguous(dw, fn, "dw");   // rows may be a column slice of a wider matrix
  const bool want_db = db.has_value() && db->defined();
  if (want_db) {
    check_cuda(*db, fn, "db");
    check_same_device(*db, dy, fn, "db", "dy");
    check_dtype(*db, fn, "db", {at::kFloat});
    check_shape(*db, fn, "db", "(S, N)", {S, N});
    check_contiguous(*db, fn, "db");
  }
  if (S == 0 || N == 0 || K == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  const cudaStream_t stream = current_stream(dy);
  const int dev = dy.get_device();
  const int sms = apm::device_sm_count(dev);
  const apm::DType in = to_apm_dtype(dy, fn, "dy");
  if (M == 0) {  // empty contraction: zero gradients
    dw.zero_();
    if (want_db) db->zero_();
    return;
  }
  apm::GemmParams p;
  p.batch = S; p.m = N; p.n = K; p.k = M;
  // A(i, k) = dy[k, i]; B(j, k) = x[k, j]: both unit stride along the output index
  p.a = dy.data_ptr(); p.a_sb = dy.stride(0); p.a_sm = 1; p.a_sk = dy.stride(1);
  p.b = x.data_ptr(); p.b_sb = batch_stride(x); p.b_sn = 1; p.b_sk = x.stride(-2);
  p.d = dw.data_ptr(); p.d_sb = dw.stride(0); p.d_sm = dw.stride(1); p.d_sn = 1;
  p.in = in;
  p.out = apm::DType::kFloat32;
  int splits = 1;
  const bool packed = dy.is_contiguous() && x.dim() == 3 && x.is_contiguous() && dw.is_contiguous();
  if (packed && gemm_policy() != 1 && apm::sm90_device_ok(dev) &&
      apm::sm90_family(p) != apm::Sm90Family::kNone) {
    splits = plan_splits(S, M, N, K, sms);
  }
  if (splits > 1 && gemm_policy() == 0) {
    // Too few output tiles to fill the GPU: cuBLAS (through ATen's bmm with an fp32 result) splits
    // the reduction inside one launch, where slicing M into batches and summing them costs a
    // second pass (the head's dW at one image, 768 x 1024 over 1024 rows: 14.6 us against 41 us
    // on the H200, benchmarks/results/h200/73ff6f9-primitives/). Forced paths keep CUTLASS.
    at::Tensor out = dw;
    at::bmm_out(out, dy.transpose(1, 2), x, at::kFloat);
    g_cublas_launches.fetch_add(1);
  } else if (splits == 1) {
    run_gemm(p, dy, fn);
  } else {
    // slices of M as extra batches (dy and x are packed, so slice i of student s is batch
    // s * splits + i with a uniform stride), partial products summed by a column sum
    const int64_t ms = M / splits;
    at::Tensor part = at::empty({S * splits, N, K}, dw.options());
    apm::GemmParams q = p;
    q.batch = S * splits; q.k = ms;
    q.a_sb = ms * N; q.b_sb = ms * K;
    q.d = part.data_ptr(); q.d_sb = N * K; q.d_sm = K;
    run_gemm(q, dy, fn);
    check_cuda_status(apm::colsum(part.data_ptr(), apm::DType::kFloat32, S, splits, N * K,
                                  dw.data_ptr<float>(), N * K, nullptr, 1, 1.0f, stream),
                      fn, "the split-K reduction");
  }
  if (want_db) {
    APM_CHECK_VALUE(dy.is_contiguous(), fn, ": dy must be contiguous when db is asked for, got "
                      "strides ", strides_str(dy));
    const int chunks = apm::colsum_chunks(S, M, N, sms);
    at::Tensor part;
    if (chunks > 1) part = at::empty({S, chunks, N}, dw.options());
    check_cuda_status(apm::colsum(dy.data_ptr(), in, S, M, N, db->data_ptr<float>(), N,
                                  chunks > 1 ? part.data_ptr<float>() : nullptr, chunks, 1.0f,
                                  stream),
                      fn, "the bias-gradient column sum");
  }
}

// The first layer's backward through the trigger split:
//   g1 = (dy w) * (p[l] + u[b] > 0) (S, B*L, H) and r = sum_l g1 (S, B, H) fp32.
// The mask is the activation ReLU(p + u) built once (it is > 0 exactly where p + u > 0) and fed to
// the masked input-gradient GEMM; r is a column sum of g1 per image.
void first_layer_bwd_input(const at::Tensor& dy, const at::Tensor& w, const c10::optional<at::Tensor>& p_in,
                           const at::Tensor& u, const at::Tensor& g1, const at::Tensor& r,
                           const c10::optional<at::Tensor>& act_in) {
  const char* fn = "first_layer_bwd_input";
  check_gemm_operand(dy, fn, "dy");
  check_gemm_operand(w, fn, "w");
  check_dim(w, fn, "w", "(S, N, H)", 3);
  check_dim(dy, fn, "dy", "(S, B*L, N)", 3);
  APM_CHECK_VALUE(p_in.has_value() || act_in.has_value(), fn, ": p may be None only when act is given");
  check_cuda(u, fn, "u");
  for (const at::Tensor* t : {&dy, &u, &g1, &r}) check_same_device(*t, w, fn, "every tensor", "w");
  check_same_dtype(dy, w, fn, "dy", "w");
  check_dtype(u, fn, "u", {at::kFloat});
  check_dtype(r, fn, "r", {at::kFloat});
  to_apm_dtype(g1, fn, "g1");
  APM_CHECK_VALUE(u.dim() == 3, fn, ": u must be (S, B, H), got shape ", sizes_str(u));
  const int64_t S = w.size(0), N = w.size(1), H = w.size(2), B = u.size(1);
  const int64_t L = p_in.has_value() ? p_in->size(1) : (B > 0 ? dy.size(1) / B : 0);
  check_positive(L, fn, "L (p's second dimension, or dy's rows per image)");
  if (p_in.has_value()) {
    const at::Tensor& p_ = *p_in;
    check_dim(p_, fn, "p", "(S, L, H)", 3);
    check_cuda(p_, fn, "p");
    check_same_device(p_, w, fn, "p", "w");
    check_same_dtype(p_, w, fn, "p", "w");
    check_shape(p_, fn, "p", "(S, L, H)", {S, L, H});
    check_contiguous(p_, fn, "p");
  }
  check_shape(u, fn, "u", "(S, B, H)", {S, B, H});
  check_shape(dy, fn, "dy", "(S, B*L, N)", {S, B * L, N});
  check_shape(g1, fn, "g1", "(S, B*L, H)", {S, B * L, H});
  check_shape(r, fn, "r", "(S, B, H)", {S, B, H});
  for (const at::Tensor* t : {&u, &g1, &r}) check_contiguous(*t, fn, "u, g1 and r");
  check_positive(N, fn, "N (the contraction size)");
  if (act_in.has_value()) {   // the activation the forward wrote out and the caller kept: the mask
    const at::Tensor& a = *act_in;
    check_cuda(a, fn, "act");
    check_same_device(a, w, fn, "act", "w");
    check_same_dtype(a, w, fn, "act", "w");
    check_shape(a, fn, "act", "(S, B*L, H)", {S, B * L, H});
    check_contiguous(a, fn, "act");
  }
  if (S == 0 || B == 0 || H == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(w.device());
  const cudaStream_t stream = current_stream(w);
  const apm::DType t = to_apm_dtype(w, fn, "w");
  at::Tensor act;
  if (act_in.has_value()) {
    act = *act_in;
  } else {
    act = at::empty({S, B * L, H}, w.options());
    check_cuda_status(apm::first_layer_act(p_in->data_ptr(), u.data_ptr<float>(), act.data_ptr(), t, S, B,
                                           L, H, stream),
                      fn, "the first-layer activation");
  }
  linear_bwd_input(dy, w, act, g1);
  const int chunks = apm::colsum_chunks(S * B, L, H, apm::device_sm_count(w.get_device()));
  at::Tensor part;
  if (chunks > 1) part = at::empty({S * B, chunks, H}, r.options());
  check_cuda_status(apm::colsum(g1.data_ptr(), to_apm_dtype(g1, fn, "g1"), S * B, L, H,
                                r.data_ptr<float>(), H, chunks > 1 ? part.data_ptr<float>() : nullptr,
                                chunks, 1.0f, stream),
                    fn, "the per-image row sum");
}

}  // namespace apm_glue
