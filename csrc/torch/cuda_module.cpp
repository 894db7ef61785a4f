// The CUDA extension module apm_fast._C_cuda: the primitives of apm_fast/ops/primitives.py as
// out-parameter functions (the Python layer in apm_fast/backends/cuda_backend.py allocates).
// torch/csrc/utils/pybind.h (pybind11 + the Tensor casters) rather than torch/extension.h: the
// latter pulls in the whole C++ frontend and doubles the compile time of this file.
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "guarded.h"

namespace apm_glue {
// cuda_gemm_ops.cpp
void linear(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, bool,
            const at::Tensor&);
void linear_bwd_input(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                      const at::Tensor&);
void linear_bwd_weight(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const c10::optional<at::Tensor>&);
void first_layer_bwd_input(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const c10::optional<at::Tensor>&);
int gemm_policy();
void set_gemm_policy(int);
std::vector<long long> gemm_counts();
void reset_gemm_counts();
bool sm90_available(const at::Tensor&);
// cuda_ops.cpp
void first_layer_act(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t);
void pool_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
              const at::Tensor&);
void pool_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
void adam_(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
           const at::Tensor&, const at::Tensor&, double, double, double,
           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
           const c10::optional<at::Tensor>&);
void broadcast_(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
}  // namespace apm_glue


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace apm_glue;
  m.doc() = "apm-fast CUDA kernels (CUTLASS SM90 GEMMs with fused epilogues, pool, Adam)";
  // The revision of the kernels' contract (apm_fast/_ext.py, KERNEL_REVISION): the Python side
  // refuses a build of another one. 2: Adam takes the moments as zeros at step 1.
  m.attr("kernel_revision") = 2;
  m.def("linear", guarded(&linear), "out = act(x w^T + bias)", py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("relu"), py::arg("out"));
  m.def("linear_bwd_input", guarded(&linear_bwd_input), "out = (dy w) * (mask > 0)", py::arg("dy"),
        py::arg("w"), py::arg("mask"), py::arg("out"));
  m.def("linear_bwd_weight", guarded(&linear_bwd_weight), "dw = dy^T x, db = sum dy (fp32)", py::arg("dy"),
        py::arg("x"), py::arg("dw"), py::arg("db"));
  m.def("first_layer_bwd_input", guarded(&first_layer_bwd_input),
        "g1 = (dy w) * (p + u > 0), r = sum_l g1 (the mask read from act = ReLU(p + u) when given; p may then "
        "be None)",
        py::arg("dy"), py::arg("w"), py::arg("p"), py::arg("u"), py::arg("g1"), py::arg("r"),
        py::arg("act") = py::none());
  m.def("first_layer_act", guarded(&first_layer_act),
        "a = ReLU(p[l] + u[b]); with width > 0, p = Q and p[l] = Q[x] + Q[width + y]", py::arg("p"), py::arg("u"),
        py::arg("a"), py::arg("height") = 0, py::arg("width") = 0);
  m.def("pool_fwd", guarded(&pool_fwd), "single-query pool forward", py::arg("f"), py::arg("pos_out"),
        py::arg("kt"), py::arg("scale"), py::arg("sbar"), py::arg("lse"));
  m.def("pool_bwd", guarded(&pool_bwd), "single-query pool backward", py::arg("f"), py::arg("pos_out"),
        py::arg("kt"), py::arg("scale"), py::arg("sbar"), py::arg("lse"), py::arg("dsbar"),
        py::arg("df"), py::arg("dkt"));
  m.def("adam_", guarded(&adam_), "one Adam step over fp32 buffers, the gradient or its factors (capturable)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("lowp"),
        py::arg("outer_a") = py::none(), py::arg("outer_b") = py::none());
  m.def("broadcast_", guarded(&broadcast_), "dst[s] = src for every s, and lowp[s] = src in lowp's dtype (the reset)",
        py::arg("dst"), py::arg("src"), py::arg("lowp") = py::none());
  m.def("gemm_policy", guarded(&gemm_policy), "0 auto, 1 portable only, 2 SM90 only");
  m.def("set_gemm_policy", guarded(&set_gemm_policy), py::arg("policy"));
  m.def("gemm_counts", guarded(&gemm_counts), "[SM90 launches, portable launches, cuBLAS launches] since the last reset");
  m.def("reset_gemm_counts", guarded(&reset_gemm_counts));
  m.def("sm90_available", guarded(&sm90_available),
        "whether like's GPU runs this build's SM90 kernels", py::arg("like"));
}
