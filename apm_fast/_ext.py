"""Lazy access to the compiled CUDA extension ``apm_fast._C_cuda`` (csrc/), with a reason when it
is missing or cannot run on this GPU. It is built only where torch has CUDA and nvcc is found;
nothing is imported until asked for, so ``import apm_fast`` never needs it.

The extension is compiled for a few SM targets only (``APM_FAST_CUDA_ARCHS`` or
``TORCH_CUDA_ARCH_LIST``, default sm_90a and sm_80), with PTX only for targets marked "+PTX", so
on a GPU none of them runs on (an sm_75 Turing, an sm_100 Blackwell without PTX) every kernel
launch fails with "no kernel image is available". setup.py compiles the list of
targets into the library (the C string ``apm_fast_cuda_archs``); :func:`device_problem` compares
it with the GPU's compute capability, so that ``available_backends()`` says so up front.
"""
from __future__ import annotations

import ctypes
import importlib
import re
from typing import List, Optional, Tuple

__all__ = ["load_extension", "BUILD_HINT", "KERNEL_REVISION", "extension_archs", "arch_runs_on", "device_problem"]

BUILD_HINT = ("build it on a machine with a CUDA build of torch and nvcc (CUTLASS headers: "
              "pip install --no-deps nvidia-cutlass==4.2.0.0) with "
              "`APM_FAST_CUDA_ARCHS=90a pip install --no-build-isolation -e .`")

# The revision of the compiled kernels' contract this Python code relies on: the extension
# reports its own (``kernel_revision``, csrc/torch/cuda_module.cpp) and a build from other
# sources is refused, by name, instead of run. Bumped with every change the cuda table depends
# on that an older build would get silently wrong, e.g. revision 2: Adam takes the moments as
# zeros at step 1 (the reset no longer zeroes them; an older build would read the last batch's).
KERNEL_REVISION = 2

_cache: list = []
_ARCHS_SYMBOL = "apm_fast_cuda_archs"


def load_extension() -> Tuple[Optional[object], str]:
    """(module, "") for ``apm_fast._C_cuda``, or (None, why it cannot be loaded or used: not
    importable, or built from sources of another kernel revision)."""
    if not _cache:
        try:
            mod = importlib.import_module("apm_fast._C_cuda")
        except ImportError as exc:
            _cache.append((None, f"the compiled extension apm_fast._C_cuda is not importable ({exc}); {BUILD_HINT}"))
        else:
            _cache.append(check_revision(mod))
    return _cache[0]


def check_revision(mod) -> Tuple[Optional[object], str]:
    """(mod, "") when the extension's kernels are this code's revision, else (None, why)."""
    got = getattr(mod, "kernel_revision", 1)          # builds before the attribute: revision 1
    if got == KERNEL_REVISION:
        return mod, ""
    return None, (f"the compiled extension apm_fast._C_cuda ({getattr(mod, '__file__', '?')}) is of kernel "
                  f"revision {got}, this code needs {KERNEL_REVISION}: it was built from other sources; "
                  f"rebuild it: {BUILD_HINT}")


def extension_archs(mod=None) -> Optional[List[str]]:
    """The SM targets the extension was compiled for (e.g. ``["90a", "80"]``), read from the
    library; None when it is not built or predates the record (then nothing can be told)."""
    if mod is None:
        mod, _ = load_extension()
        if mod is None:
            return None
    try:
        lib = ctypes.CDLL(mod.__file__)     # already loaded: the same handle, nothing runs
        first = ctypes.c_char.in_dll(lib, _ARCHS_SYMBOL)
        text = ctypes.string_at(ctypes.addressof(first)).decode("ascii")
    except (OSError, ValueError, AttributeError, TypeError, UnicodeDecodeError):
        return None
    return [a for a in text.split(";") if a] or None


def arch_runs_on(arch: str, capability: Tuple[int, int]) -> bool:
    """Whether code for ``arch`` ("80", "90a", "100", "80+PTX") runs on a GPU of ``capability``:
    machine code on the same major version and at least its minor, an arch-specific target
    ("90a") only on exactly its version (NVIDIA's compatibility rules for cubins); "+PTX" also on
    every later GPU (the driver compiles the PTX), except on an arch-specific or family target
    ("90a+PTX", "100f+PTX"): their PTX (compute_90a) is not forward-compatible."""
    m = re.fullmatch(r"(\d+)(\d)([af]?)(\+PTX)?", arch)
    if m is None:
        return False
    major, minor, kind = int(m.group(1)), int(m.group(2)), m.group(3)
    if kind == "a":
        return tuple(capability) == (major, minor)
    if m.group(4) and not kind and tuple(capability) >= (major, minor):
        return True
    return capability[0] == major and capability[1] >= minor


def device_problem(device=None) -> str:
    """Why the extension cannot run on ``device`` (default: the current CUDA device), or "" when
    it can or when its targets are not recorded."""
    import torch

    archs = extension_archs()
    if not archs:
        return ""
    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    cap = tuple(torch.cuda.get_device_capability(index))
    if any(arch_runs_on(a, cap) for a in archs):
        return ""
    suggest = f"{cap[0]}{cap[1]}" + ("a" if cap == (9, 0) else "")
    return (f"the extension apm_fast._C_cuda was built for sm_{', sm_'.join(archs)}, none of which runs on "
            f"cuda:{index}, {torch.cuda.get_device_name(index)} (sm_{cap[0]}{cap[1]}); rebuild it for this "
            f"GPU: APM_FAST_CUDA_ARCHS={suggest} pip install --no-build-isolation -e .")
