"""Lazy access to the compiled extensions (csrc/), with a reason when one is missing.

``apm_fast._C_cpu`` (CPU C++ ops) is built by every install that has a C++ compiler;
``apm_fast._C_cuda`` (CUDA kernels) only where torch has CUDA and nvcc is found. Nothing is
imported until asked for, so ``import apm_fast`` never needs them.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

__all__ = ["load_extension", "BUILD_HINT_CUDA", "BUILD_HINT_CPU"]

BUILD_HINT_CUDA = ("build it on a machine with a CUDA build of torch and nvcc (CUTLASS headers: "
                   "pip install --no-deps nvidia-cutlass==4.2.0.0) with "
                   "`APM_FAST_CUDA_ARCHS=90a pip install --no-build-isolation -e .`")
BUILD_HINT_CPU = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler and ninja)"

_cache: Dict[str, Tuple[Optional[object], str]] = {}


def load_extension(name: str) -> Tuple[Optional[object], str]:
    """(module, "") for ``apm_fast.<name>``, or (None, why it cannot be loaded)."""
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"apm_fast.{name}"), "")
        except ImportError as exc:
            hint = BUILD_HINT_CUDA if name == "_C_cuda" else BUILD_HINT_CPU
            _cache[name] = (None, f"the compiled extension apm_fast.{name} is not importable "
                                  f"({exc}); {hint}")
    return _cache[name]
