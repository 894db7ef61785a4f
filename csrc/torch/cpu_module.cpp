// The CPU extension module apm_fast._C_cpu: the non-GEMM primitives in C++ (at::parallel_for),
// built everywhere so that CI exercises the C++ path; see csrc/cpu/.
// torch/csrc/utils/pybind.h (pybind11 + the Tensor casters) rather than torch/extension.h: the
// latter pulls in the whole C++ frontend and doubles the compile time of this file.
#include <torch/csrc/utils/pybind.h>

#include "../cpu/cpu_ops.h"
#include "guarded.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace apm_cpu;
  using apm_glue::guarded;
  m.doc() = "apm-fast CPU kernels: trigger split, single-query pool, Adam";
  m.def("trigger_u", guarded(&trigger_u), "u = W_T t + b1 (into u)", py::arg("t"), py::arg("w1"),
        py::arg("b1"), py::arg("u"));
  m.def("first_layer_act", guarded(&first_layer_act), "a = ReLU(p[l] + u[b]) (into a)", py::arg("p"),
        py::arg("u"), py::arg("a"));
  m.def("first_layer_mask_sum", guarded(&first_layer_mask_sum),
        "g1 = g * (p[l] + u[b] > 0), r = sum_l g1 (into g1, r)", py::arg("g"), py::arg("p"),
        py::arg("u"), py::arg("g1"), py::arg("r"));
  m.def("pool_fwd", guarded(&pool_fwd), "single-query pool forward (into sbar, lse)", py::arg("f"),
        py::arg("pos_out"), py::arg("kt"), py::arg("scale"), py::arg("sbar"), py::arg("lse"));
  m.def("pool_bwd", guarded(&pool_bwd), "single-query pool backward (into df, dkt)", py::arg("f"),
        py::arg("pos_out"), py::arg("kt"), py::arg("scale"), py::arg("sbar"), py::arg("lse"),
        py::arg("dsbar"), py::arg("df"), py::arg("dkt"));
  m.def("adam_", guarded(&adam_), "one Adam step over flat buffers, in place", py::arg("params"),
        py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("lowp"));
}
