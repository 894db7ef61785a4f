// Argument checks at the C++ boundary, shared by the CPU and CUDA bindings. Each failure raises a
// Python exception naming the function, the argument, what was expected and what came:
// TypeError for a wrong dtype, ValueError for a wrong shape or layout, RuntimeError for a wrong
// device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace apm_glue {

// Messages are built here without std::ostream: on the GPU machine's image (torch 2.11) any
// number formatted by an ostream inside an extension crashed the process (segmentation fault;
// seen in a minimal extension: `os << t.sizes()`, `TORCH_CHECK(false, "...", t.sizes())`, and in
// these modules for every argument error whose message held a number), while std::to_string and
// snprintf are fine. So the checks format with `msg` below and throw the library's own types,
// which guarded.h turns into Python's ValueError / TypeError / RuntimeError.
struct ArgValueError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ArgTypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ArgRuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void put(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) {
  s += c10::DeviceTypeName(v.type(), /*lower_case=*/true);
  if (v.has_index()) s += ":" + std::to_string(static_cast<int>(v.index()));
}
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s += buf;
}

// The message of an argument error: the pieces concatenated (strings, numbers, dtypes, devices).
template <typename... A>
inline std::string msg(const A&... pieces) {
  std::string s;
  (put(s, pieces), ...);
  return s;
}

}  // namespace apm_glue

#define APM_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) throw ::apm_glue::ArgValueError(::apm_glue::msg(__VA_ARGS__)); } while (0)
#define APM_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) throw ::apm_glue::ArgTypeError(::apm_glue::msg(__VA_ARGS__)); } while (0)
#define APM_CHECK(cond, ...) \
  do { if (!(cond)) throw ::apm_glue::ArgRuntimeError(::apm_glue::msg(__VA_ARGS__)); } while (0)

namespace apm_glue {

// "[a, b, c]" from plain integers.
template <typename Ints>
inline std::string ints_str(const Ints& ints) {
  std::string out = "[";
  bool first = true;
  for (int64_t d : ints) {
    if (!first) out += ", ";
    out += std::to_string(d);
    first = false;
  }
  return out + "]";
}

inline std::string sizes_str(const at::Tensor& t) { return ints_str(t.sizes()); }
inline std::string strides_str(const at::Tensor& t) { return ints_str(t.strides()); }
inline std::string dims_str(std::initializer_list<int64_t> dims) { return ints_str(dims); }

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
  std::string names;
  for (auto s : allowed) {
    if (!names.empty()) names += " or ";
    names += c10::toString(s);
  }
  APM_CHECK_TYPE(false, fn, ": ", name, " must have dtype ", names, ", got ", t.scalar_type());
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
                    " must be contiguous (call .contiguous()), got strides ", strides_str(t));
}

// The last dimension has unit stride (rows may be padded or be a column slice of a wider matrix).
inline void check_rows_contiguous(const at::Tensor& t, const char* fn, const char* name) {
  APM_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, fn, ": ", name,
                    " must have a unit stride in its last dimension (call .contiguous()), got "
                    "strides ",
                    strides_str(t));
}

inline void check_positive(int64_t v, const char* fn, const char* what) {
  APM_CHECK_VALUE(v > 0, fn, ": ", what, " must be positive, got ", v);
}

inline void check_numel_one(const at::Tensor& t, const char* fn, const char* name) {
  APM_CHECK_VALUE(t.numel() == 1, fn, ": ", name, " must hold one element, got shape ",
                    sizes_str(t));
}

}  // namespace apm_glue
