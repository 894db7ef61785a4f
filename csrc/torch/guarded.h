// guarded(&fn): a binding wrapper that turns the argument errors of checks.h (and any c10 error
// from torch itself) into pybind11's own exception types inside the module, so that nothing but
// pybind11's built-in types crosses into the interpreter: on the GPU machine's image (torch 2.11)
// an error leaving a module otherwise crashed the process. The message is taken without the C++
// backtrace. ArgTypeError -> TypeError, ArgValueError -> ValueError, the rest -> RuntimeError.
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <utility>

#include "checks.h"

namespace apm_glue {

template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const ArgTypeError& e) {
      throw pybind11::type_error(e.what());
    } catch (const ArgValueError& e) {
      throw pybind11::value_error(e.what());
    } catch (const ArgRuntimeError& e) {
      throw std::runtime_error(e.what());
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
