"""Lazy access to the compiled CUDA extension ``apm_fast._C_cuda`` (csrc/), with a reason when it
is missing. It is built only where torch has CUDA and nvcc is found; nothing is imported until
asked for, so ``import apm_fast`` never needs it."""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

__all__ = ["load_extension", "BUILD_HINT"]

BUILD_HINT = ("build it on a machine with a CUDA build of torch and nvcc (CUTLASS headers: "
              "pip install --no-deps nvidia-cutlass==4.2.0.0) with "
              "`APM_FAST_CUDA_ARCHS=90a pip install --no-build-isolation -e .`")

_cache: list = []


def load_extension() -> Tuple[Optional[object], str]:
    """(module, "") for ``apm_fast._C_cuda``, or (None, why it cannot be loaded)."""
    if not _cache:
        try:
            _cache.append((importlib.import_module("apm_fast._C_cuda"), ""))
        except ImportError as exc:
            _cache.append((None, f"the compiled extension apm_fast._C_cuda is not importable ({exc}); {BUILD_HINT}"))
    return _cache[0]
