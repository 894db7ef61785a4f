"""Packaging: a complete sdist, PEP 621 metadata, a build that says what it built; the CUDA
extension's architectures checked against the GPU; benchmark plots drawn from bench-results."""
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import apm_fast
from apm_fast import _ext, backends

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- sdist and metadata
def _sdist_files():
    """The files MANIFEST.in puts into the sdist (setuptools' own template processing)."""
    from setuptools._distutils.filelist import FileList

    fl = FileList()
    fl.findall(str(ROOT))
    fl.files = [str(Path(f).relative_to(ROOT)) for f in fl.allfiles]
    fl.allfiles = list(fl.files)
    kept = FileList()
    kept.allfiles = fl.allfiles
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kept.process_template_line(line)
    return set(kept.files)


def test_manifest_puts_the_sources_of_the_build_into_the_sdist():
    files = _sdist_files()
    needed = ["README.md", "LICENSE", "setup.py", "pyproject.toml", "csrc/build_config.py",
              "csrc/torch/cuda_module.cpp", "csrc/cuda/apm_kernels.h", "kernels/gemm.py",
              "apm_fast/data/templates.json", "apm_fast/data/imagenet_wnids.txt"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")]
    for f in needed:
        assert f in files, f
    assert not [f for f in files if f.endswith((".so", ".pyc"))], "no build outputs in the sdist"


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the apm-fast developers" in text


def test_pep621_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "apm-fast" and meta["version"] == apm_fast.__version__ == "0.1.0"
    assert meta["requires-python"] == ">=3.10" and meta["readme"] == "README.md" and meta["license"] == {"text": "MIT"}
    assert {"torch", "numpy", "safetensors", "tqdm", "pillow"} <= {d.split(">")[0].split("=")[0] for d in
                                                                   meta["dependencies"]}
    extras = meta["optional-dependencies"]
    assert extras["demo"] == ["scikit-image"] and extras["plots"] == ["matplotlib"]
    assert extras["eval"] == ["open_clip_torch"] and extras["clip"] == ["open_clip_torch"]
    assert extras["triton"] == ["triton"]
    assert meta["scripts"]["apm-fast"] == "apm_fast.cli:main"


def test_the_build_says_what_it_built(monkeypatch, capsys):
    """setup.py run as a build (setup() itself stubbed): a summary naming what was and was not
    built, on stderr at the end."""
    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    monkeypatch.setenv("APM_FAST_SKIP_CUDA_BUILD", "0")
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert "apm-fast build summary" in err
    assert "built:" in err and "the Python package apm_fast" in err and "Triton kernels" in err
    if torch.version.cuda is None:
        assert "NOT built: the CUDA extension apm_fast._C_cuda" in err and "CUDA build of torch" in err
    assert "name" not in seen and "version" not in seen, "metadata comes from pyproject.toml"


# ---------------------------------------------------------------- the GPU's architecture
class _FakeExt:
    __file__ = "/nowhere/_C_cuda.so"


def _fake_extension(monkeypatch, archs):
    """The cuda table sees a loaded extension whose record says ``archs``."""
    from apm_fast.backends import cuda

    fake = lambda: (_FakeExt(), "")  # noqa: E731
    monkeypatch.setattr(_ext, "load_extension", fake)
    monkeypatch.setattr(cuda, "load_extension", fake)
    monkeypatch.setattr(_ext, "extension_archs", lambda mod=None: archs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_MADE", {})


@pytest.mark.parametrize("archs, capability, ok", [
    (["90a", "80"], (10, 0), False),      # Blackwell: neither sm_90a nor sm_80 code runs
    (["90a", "80"], (7, 5), False),       # Turing: older than every target
    (["90a", "80"], (9, 0), True),
    (["90a", "80"], (8, 6), True),        # sm_80 code runs on 8.6 (same major, newer minor)
    (["90a"], (9, 1), False),             # sm_90a code runs on 9.0 only
    (["90"], (9, 1), True),
])
def test_cuda_backend_says_when_the_gpu_is_not_a_build_target(monkeypatch, archs, capability, ok):
    _fake_extension(monkeypatch, archs)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    state = backends.available_backends()["cuda"]
    if ok:
        assert state == "available"
    else:
        sm = f"sm_{capability[0]}{capability[1]}"
        assert f"built for sm_{', sm_'.join(archs)}" in state and f"Test GPU ({sm})" in state, state
        assert "APM_FAST_CUDA_ARCHS" in state
        with pytest.raises(backends.BackendUnavailable, match="built for"):
            backends.get_backend("cuda")


def test_an_extension_without_a_record_of_its_archs_is_not_refused(monkeypatch):
    _fake_extension(monkeypatch, None)
    assert backends.available_backends()["cuda"] == "available"


def test_a_build_of_another_kernel_revision_is_refused_by_name(monkeypatch):
    """A stale build (compiled from older sources, e.g. an editable install not rebuilt after a
    pull) is refused with its revision, the one needed and how to rebuild, not run; the build's
    revision is the one the bindings declare (csrc/torch/cuda_module.cpp)."""
    import re

    declared = re.search(r'm\.attr\("kernel_revision"\) = (\d+);', (ROOT / "csrc/torch/cuda_module.cpp").read_text())
    assert declared and int(declared.group(1)) == _ext.KERNEL_REVISION
    same = type("M", (), {"kernel_revision": _ext.KERNEL_REVISION, "__file__": "x.so"})
    assert _ext.check_revision(same) == (same, "")
    for old in (type("M", (), {"__file__": "old.so"}), type("M", (), {"kernel_revision": 1, "__file__": "old.so"})):
        mod, why = _ext.check_revision(old)
        assert mod is None
        assert f"revision 1, this code needs {_ext.KERNEL_REVISION}" in why and "pip install" in why and "old.so" in why
    # through the table: unavailable, with that reason
    from apm_fast.backends import cuda

    stale = lambda: _ext.check_revision(type("M", (), {"kernel_revision": 1, "__file__": "old.so"}))  # noqa: E731
    monkeypatch.setattr(cuda, "load_extension", stale)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_MADE", {})
    assert "this code needs" in backends.available_backends()["cuda"]
    with pytest.raises(backends.BackendUnavailable, match="kernel revision 1"):
        backends.get_backend("cuda")


def test_the_archs_record_is_read_from_the_compiled_library(tmp_path):
    """The C source setup.py adds to the extension, compiled into a shared library here, read back."""
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    setup_ns = runpy.run_path(str(ROOT / "setup.py"), run_name="apm_fast_setup_as_module")
    src = tmp_path / "build_info.cpp"
    src.write_text(setup_ns["build_info_source"](["90a", "80"]))
    lib = tmp_path / "libinfo.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-fvisibility=hidden", str(src), "-o", str(lib)], check=True)
    mod = type("M", (), {"__file__": str(lib)})
    assert _ext.extension_archs(mod) == ["90a", "80"]


# ---------------------------------------------------------------- benchmark outputs
def test_make_plots_draws_from_bench_results():
    text = (ROOT / "Makefile").read_text()
    recipe = text[text.index("\nplots:"):].split("\n\n")[0]
    assert "bench-results" in recipe and "benchmarks/results" not in recipe


def test_bench_plot_requires_its_folder(capsys):
    from apm_fast.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench-plot"])
    assert info.value.code == 2 and "directory" in capsys.readouterr().err


def test_torch_arch_list_and_ptx():
    """TORCH_CUDA_ARCH_LIST is honoured when APM_FAST_CUDA_ARCHS is unset; "+PTX" embeds PTX, which
    the run-time check knows runs on later GPUs."""
    import importlib.util

    from apm_fast._ext import arch_runs_on

    spec = importlib.util.spec_from_file_location("bc", ROOT / "csrc" / "build_config.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    import os
    saved = {k: os.environ.pop(k, None) for k in ("APM_FAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST")}
    try:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a;8.6+PTX"
        assert bc.parse_archs() == ["80", "90a", "86+PTX"]
        os.environ["APM_FAST_CUDA_ARCHS"] = "90a"
        assert bc.parse_archs() == ["90a"]                                  # the package's own wins
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    flags = bc.gencode_flags(["90a", "86+PTX"])
    assert "-gencode=arch=compute_86,code=compute_86" in flags and "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert arch_runs_on("86+PTX", (10, 0)) and not arch_runs_on("86", (10, 0)) and not arch_runs_on("90a", (10, 0))
