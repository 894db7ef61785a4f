// Argument checks at the C++ boundary, shared by the CPU and CUDA bindings. Each failure raises a
// Python exception naming the function, the argument, what was expected and what came:
// TypeError for a wrong dtype, ValueError for a wrong shape or layout, RuntimeError for a wrong
// device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>

#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace apm_glue {

// The checks throw these (never c10's ValueError/TypeError): on the GPU machine's image a
// c10::ValueError thrown in an extension crashed the process while being caught (segmentation
// fault; c10::Error and c10::TypeError were caught), so the argument errors use types of this
// library, which guarded.h turns into Python's ValueError / TypeError / RuntimeError.
struct ArgValueError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ArgTypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ArgRuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace apm_glue

#define APM_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) throw ::apm_glue::ArgValueError(::c10::str(__VA_ARGS__)); } while (0)
#define APM_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) throw ::apm_glue::ArgTypeError(::c10::str(__VA_ARGS__)); } while (0)
#define APM_CHECK(cond, ...) \
  do { if (!(cond)) throw ::apm_glue::ArgRuntimeError(::c10::str(__VA_ARGS__)); } while (0)

namespace apm_glue {

inline std::string sizes_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline std::string dims_str(std::initializer_list<int64_t> dims) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (int64_t d : dims) {
    os << (first ? "" : ", ") << d;
    first = false;
  }
  os << "]";
  return os.str();
}

inline void check_defined(const at::Tensor& t, const char* fn, const char* name) {
  APM_CHECK_VALUE(t.defined(), fn, ": ", name, " is an undefined tensor");
}

inline void check_cuda(const at::Tensor& t, const char* fn, const char* name) {
  check_defined(t, fn, name);
  APM_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
}

inline void check_cpu(const at::Tensor& t, const char* fn, const char* name) {
  check_defined(t, fn, name);
  APM_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got a tensor on ",
              t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* fn,
                              const char* name, const char* ref_name) {
  APM_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* fn, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed)
    if (t.scalar_type() == s) return;
  std::ostringstream os;
  bool first = true;
  for (auto s : allowed) {
    os << (first ? "" : " or ") << s;
    first = false;
  }
  APM_CHECK_TYPE(false, fn, ": ", name, " must have dtype ", os.str(), ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* fn,
                             const char* name, const char* ref_name) {
  APM_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), fn, ": ", name,
                   " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

// Exact shape; `what` names the dimensions, e.g. "(S, B*L, H)".
inline void check_shape(const at::Tensor& t, const char* fn, const char* name, const char* what,
                        std::initializer_list<int64_t> dims) {
  bool ok = t.dim() == static_cast<int64_t>(dims.size());
  if (ok) {
    int64_t i = 0;
    for (int64_t d : dims) ok = ok && t.size(i++) == d;
  }
  APM_CHECK_VALUE(ok, fn, ": ", name, " must have shape ", what, " = ", dims_str(dims), ", got ",
                    sizes_str(t));
}

inline void check_dim(const at::Tensor& t, const char* fn, const char* name, const char* what,
                      int64_t dim) {
  APM_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D ", what, ", got shape ",
                    sizes_str(t));
}

inline void check_contiguous(const at::Tensor& t, const char* fn, const char* name) {
  APM_CHECK_VALUE(t.is_contiguous(), fn, ": ", name,
                    " must be contiguous (call .contiguous()), got strides ", t.strides());
}

// The last dimension has unit stride (rows may be padded or be a column slice of a wider matrix).
inline void check_rows_contiguous(const at::Tensor& t, const char* fn, const char* name) {
  APM_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, fn, ": ", name,
                    " must have a unit stride in its last dimension (call .contiguous()), got "
                    "strides ",
                    t.strides());
}

inline void check_positive(int64_t v, const char* fn, const char* what) {
  APM_CHECK_VALUE(v > 0, fn, ": ", what, " must be positive, got ", v);
}

inline void check_numel_one(const at::Tensor& t, const char* fn, const char* name) {
  APM_CHECK_VALUE(t.numel() == 1, fn, ": ", name, " must hold one element, got shape ",
                    sizes_str(t));
}

}  // namespace apm_glue
