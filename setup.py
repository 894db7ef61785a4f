"""apm-fast build: the Python package (with the Triton kernels of kernels/ as apm_fast.kernels) and
its CUDA extension (csrc/) apm_fast._C_cuda where torch has CUDA and nvcc is found. It is optional:
a failed build warns and the package still installs (the cuda backend then says what is missing).
Settings: see csrc/build_config.py."""
import importlib.util
import os
import warnings
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# -g0 overrides the -g of Python's own CFLAGS: debug info of the torch headers doubles the build time
CXX_FLAGS = ["-O3", "-g0"]


def _build_config():
    spec = importlib.util.spec_from_file_location("apm_fast_build_config", HERE / "csrc" / "build_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    """(ext_modules, cmdclass): the CUDA extension where torch has CUDA and nvcc is found, else
    none (the package still installs; ``apm-fast info`` then says why the cuda backend is absent)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # building the pure-Python package still works
        warnings.warn(f"apm-fast: torch is not importable ({exc}); building without the CUDA extension")
        return [], {}
    cfg = _build_config()
    if os.environ.get("APM_FAST_SKIP_CUDA_BUILD", "0") == "1":
        print("apm-fast: APM_FAST_SKIP_CUDA_BUILD=1, building without the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        warnings.warn("apm-fast: building without the CUDA extension (it needs a CUDA build of torch "
                      f"and nvcc; torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return [], {}
    archs = cfg.parse_archs()
    cutlass = cfg.cutlass_include_dir()
    if cutlass is None:
        warnings.warn("apm-fast: CUTLASS headers not found (pip install --no-deps "
                      "nvidia-cutlass==4.2.0.0, or set APM_FAST_CUTLASS_INCLUDE): the CUDA "
                      "extension is built with its portable GEMM only")
    print(f"apm-fast: building the CUDA extension for sm_{', sm_'.join(archs)} (CUTLASS: {cutlass})")
    ext = CUDAExtension("apm_fast._C_cuda", cfg.CUDA_GLUE_SOURCES + cfg.cuda_kernel_sources(),
                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": cfg.nvcc_flags(archs, cutlass)})

    class OptionalBuildExt(BuildExtension):
        """A failed build warns instead of failing the install (APM_FAST_STRICT_BUILD=1: fails)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # e.g. torch's CUDA version check, before any compile
                if os.environ.get("APM_FAST_STRICT_BUILD") == "1":
                    raise
                warnings.warn(f"apm-fast: the CUDA extension cannot be built ({type(exc).__name__}: "
                              f"{exc}); the package installs without it")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="apm-fast",
    version="0.1.0",
    description="Fused GPU kernels for the Asynchronous Perception Machine (APM)",
    python_requires=">=3.10",
    packages=find_packages(include=["apm_fast", "apm_fast.*"]) + ["apm_fast.kernels"],
    package_dir={"apm_fast.kernels": "kernels"},
    package_data={"apm_fast": ["data/*.txt", "data/*.json"]},
    install_requires=["torch", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={"clip": ["open_clip_torch"], "triton": ["triton"]},
    entry_points={"console_scripts": ["apm-fast = apm_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
