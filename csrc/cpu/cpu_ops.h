// CPU implementations (at::parallel_for) of the non-GEMM primitives; bound in cpu_module.cpp.
// Outputs are passed in and written completely.
#pragma once

#include <ATen/core/Tensor.h>

namespace apm_cpu {

void trigger_u(const at::Tensor& t, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& u);
void first_layer_act(const at::Tensor& p, const at::Tensor& u, const at::Tensor& a);
void first_layer_mask_sum(const at::Tensor& g, const at::Tensor& p, const at::Tensor& u,
                          const at::Tensor& g1, const at::Tensor& r);
void pool_fwd(const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt, double scale,
              const at::Tensor& sbar, const at::Tensor& lse);
void pool_bwd(const at::Tensor& f, const at::Tensor& pos, const at::Tensor& kt, double scale,
              const at::Tensor& sbar, const at::Tensor& lse, const at::Tensor& dsbar,
              const at::Tensor& df, const at::Tensor& dkt);
void adam_(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
           const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& lr, double beta1,
           double beta2, double eps, const c10::optional<at::Tensor>& lowp);

}  // namespace apm_cpu
