"""Build settings of the CUDA extension, shared by setup.py and tests/test_cuda_compile.py.

Environment variables:
  APM_FAST_CUDA_ARCHS       ";"-separated SM targets of the CUDA build (default "90a;80": sm_90a
                            for the wgmma/TMA kernels, sm_80 as a portable target that runs the
                            portable GEMM everywhere else); "XY+PTX" also embeds PTX for later GPUs
                            (not on an arch-specific "XYa" target, whose PTX runs nowhere else).
  APM_FAST_SKIP_CUDA_BUILD  "1": build the Python package without the CUDA extension.
  APM_FAST_CUTLASS_INCLUDE  CUTLASS include directory (default: the `nvidia-cutlass` package's
                            cutlass_library/source/include, or $CUTLASS_PATH/include).
  APM_FAST_STRICT_BUILD     "1": the install fails whenever the extension is not built, for any
                            reason (default: warn and install the package without it).
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path("csrc")

CUDA_GLUE_SOURCES = [str(CSRC / p) for p in (
    "torch/cuda_module.cpp", "torch/cuda_gemm_ops.cpp", "torch/cuda_ops.cpp")]


def cuda_kernel_sources() -> List[str]:
    """Every .cu file of csrc/cuda, relative to the repository root."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cuda").glob("*.cu"))


def parse_archs(spec: Optional[str] = None) -> List[str]:
    """"90a;80" -> ["90a", "80"]; raises ValueError naming a malformed entry.

    The targets come from ``APM_FAST_CUDA_ARCHS``, else from torch's ``TORCH_CUDA_ARCH_LIST``
    ("8.0;9.0a;8.6+PTX" -> ["80", "90a", "86+PTX"]: "+PTX" also embeds PTX for the GPUs after it),
    else "90a;80". "+PTX" on an arch-specific target ("90a+PTX") is refused: its PTX (compute_90a)
    runs on no other GPU."""
    source = "APM_FAST_CUDA_ARCHS"
    if spec is None:
        spec = os.environ.get("APM_FAST_CUDA_ARCHS")
    if spec is None and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        source = "TORCH_CUDA_ARCH_LIST (APM_FAST_CUDA_ARCHS unset)"
        spec = ";".join(a.replace(".", "") for a in re.split(r"[;, ]+", os.environ["TORCH_CUDA_ARCH_LIST"])
                        if a.strip())
    if spec is None:
        spec = "90a;80"
    archs = [a.strip() for a in re.split(r"[;, ]+", spec) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d{2,3}a?(\+PTX)?", a):
            raise ValueError(f"{source}: expected entries like 90a, 80 or 80+PTX, got {a!r} in {spec!r}")
        if a.endswith("a+PTX"):
            # the PTX of an arch-specific target (compute_90a) runs on no other GPU: it would promise
            # forward compatibility it does not give
            base = a[:-len("a+PTX")]
            raise ValueError(f"{source}: {a!r} in {spec!r}: the PTX of an arch-specific target "
                             f"(compute_{base}a) runs on no later GPU; for forward compatibility add "
                             f"a portable target with PTX, e.g. \"{base}a;{base}+PTX\"")
    if not archs:
        raise ValueError(f"{source}: no architecture in {spec!r}")
    return archs


def cutlass_include_dir() -> Optional[str]:
    """The CUTLASS include directory (holding cutlass/cutlass.h and cute/), or None."""
    candidates = []
    if os.environ.get("APM_FAST_CUTLASS_INCLUDE"):
        candidates.append(Path(os.environ["APM_FAST_CUTLASS_INCLUDE"]))
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "source" / "include")
    for c in candidates:
        if (c / "cutlass" / "cutlass.h").is_file() and (c / "cute" / "tensor.hpp").is_file():
            return str(c)
    return None


def gencode_flags(archs: List[str]) -> List[str]:
    """SASS for every target; "XY+PTX" also embeds compute_XY PTX, which the driver compiles for
    GPUs newer than any SASS target (forward compatibility)."""
    out = []
    for a in archs:
        base = a.replace("+PTX", "")
        out.append(f"-gencode=arch=compute_{base},code=sm_{base}")
        if a.endswith("+PTX"):
            out.append(f"-gencode=arch=compute_{base},code=compute_{base}")
    return out


def nvcc_flags(archs: List[str], cutlass_dir: Optional[str]) -> List[str]:
    """nvcc flags of the kernels (.cu files), identical in the build and the compile check."""
    flags = [
        "-O3", "-std=c++17",
        # no device asserts: inside the wgmma pipeline they serialize it (ptxas warning C7510)
        "-DNDEBUG",
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        # torch's defaults switch the half/bf16 operators off; CUTLASS needs them
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-lineinfo",  # source lines in compute-sanitizer and ncu reports
    ] + gencode_flags(archs)
    if cutlass_dir is None:
        flags.append("-DAPM_FAST_NO_CUTLASS")
    else:
        flags.append(f"-I{cutlass_dir}")
        if any(a.startswith("90a") for a in archs):
            flags.append("-DAPM_FAST_SM90A")
    return flags
