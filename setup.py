"""apm-fast build: the Python package (with the Triton kernels of kernels/ as apm_fast.kernels)."""
from setuptools import find_packages, setup

setup(
    name="apm-fast",
    version="0.1.0",
    description="Fused GPU kernels for the Asynchronous Perception Machine (APM)",
    python_requires=">=3.10",
    packages=find_packages(include=["apm_fast", "apm_fast.*"]) + ["apm_fast.kernels"],
    package_dir={"apm_fast.kernels": "kernels"},
    install_requires=["torch", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={"clip": ["open_clip_torch"], "triton": ["triton"]},
    entry_points={"console_scripts": ["apm-fast = apm_fast.cli:main"]},
)
