// Adam (no weight decay) over flat parameter buffers on the CPU, at::parallel_for over elements;
// the same update as csrc/cuda/adam.cu and torch.optim.Adam:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// `step` (the number of this update, 1 for the first) and `lr` are one-element tensors, read
// when the update runs, as on the GPU where they stay in device memory for graph capture.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>

#include "../torch/checks.h"
#include "cpu_ops.h"

namespace apm_cpu {

using namespace apm_glue;

void adam_(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
           const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& lr, double beta1,
           double beta2, double eps, const c10::optional<at::Tensor>& lowp) {
  const char* fn = "adam_";
  check_cpu(params, fn, "params");
  check_dtype(params, fn, "params", {at::kFloat, at::kDouble});
  const std::pair<const at::Tensor*, const char*> bufs[] = {
      {&params, "params"}, {&grads, "grads"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& b : bufs) {
    check_cpu(*b.first, fn, b.second);
    check_same_dtype(*b.first, params, fn, b.second, "params");
    check_contiguous(*b.first, fn, b.second);
    APM_CHECK_VALUE(b.first->numel() == params.numel(), fn, ": ", b.second, " must have as many ",
                      "elements as params (", params.numel(), "), got ", b.first->numel());
  }
  for (const auto& b : {std::make_pair(&step, "step"), std::make_pair(&lr, "lr")}) {
    check_cpu(*b.first, fn, b.second);
    check_dtype(*b.first, fn, b.second, {at::kFloat, at::kDouble});
    check_numel_one(*b.first, fn, b.second);
  }
  APM_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, fn, ": beta1 must be in [0, 1), got ", beta1);
  APM_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, fn, ": beta2 must be in [0, 1), got ", beta2);
  APM_CHECK_VALUE(eps > 0.0, fn, ": eps must be positive, got ", eps);
  const bool has_lowp = lowp.has_value() && lowp->defined();
  if (has_lowp) {
    check_cpu(*lowp, fn, "lowp");
    check_dtype(*lowp, fn, "lowp", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
    check_contiguous(*lowp, fn, "lowp");
    APM_CHECK_VALUE(lowp->numel() == params.numel(), fn, ": lowp must have as many elements as ",
                      "params (", params.numel(), "), got ", lowp->numel());
  }
  const double t = step.item<double>();
  APM_CHECK_VALUE(t >= 1.0, fn, ": step must hold the number of this update (>= 1), got ", t);
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, t));
  const double step_size = lr.item<double>() / bc1;
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "adam_", [&] {
    using T = scalar_t;
    T* p = params.data_ptr<T>();
    const T* g = grads.data_ptr<T>();
    T* m = exp_avg.data_ptr<T>();
    T* v = exp_avg_sq.data_ptr<T>();
    // 1 - beta in double, then rounded (as torch does): 1.0f - 0.999f is off by 1e-5 relative
    const T b1 = static_cast<T>(beta1), b2 = static_cast<T>(beta2), ep = static_cast<T>(eps);
    const T omb1 = static_cast<T>(1.0 - beta1), omb2 = static_cast<T>(1.0 - beta2);
    const T ss = static_cast<T>(step_size), bc2s = static_cast<T>(bc2_sqrt);
    at::parallel_for(0, params.numel(), 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const T gi = g[i];
        const T mi = b1 * m[i] + omb1 * gi;
        const T vi = b2 * v[i] + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= ss * mi / (std::sqrt(vi) / bc2s + ep);
      }
    });
  });
  if (has_lowp) lowp->view(params.sizes()).copy_(params);
}

}  // namespace apm_cpu
