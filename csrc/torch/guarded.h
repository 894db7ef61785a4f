// guarded(&fn): a binding wrapper that turns the c10 errors of the argument checks into pybind11's
// own exception types inside the module. Measured on the GPU machine's image (torch 2.11): an
// argument error leaving the CPU module as a c10::Error crashed the process (segmentation fault)
// instead of raising, while the same error through this wrapper, in the CUDA module, raised
// RuntimeError with the message. pybind11's built-in types are always translated; the message is
// taken without the C++ backtrace. TypeError, ValueError and RuntimeError keep their meaning
// (see checks.h).
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <utility>

namespace apm_glue {

template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const c10::TypeError& e) {
      throw pybind11::type_error(e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      throw pybind11::value_error(e.what_without_backtrace());
    } catch (const c10::Error& e) {
      throw std::runtime_error(e.what_without_backtrace());
    }
  };
}

}  // namespace apm_glue
