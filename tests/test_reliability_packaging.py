"""Packaging: a complete sdist, PEP 621 metadata, a build that says what it built (and, strict,
fails when the extension is not built); the CUDA extension's architectures checked against the
GPU; benchmark plots drawn from bench-results; the commit benchmark records name."""
import importlib.machinery
import re
import runpy
import shutil
import subprocess
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


def test_the_sdist_carries_the_whole_test_suite():
    """The tests run from an unpacked sdist: their conftest, helpers, tiny model and the stub
    headers of the compile check ship with them, caches do not."""
    files = _sdist_files()
    needed = ["tests/conftest.py", "tests/helpers.py", "tests/tiny_clip.py",
              "tests/cuda_stub_include/c10/cuda/impl/cuda_cmake_macros.h"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*")
               if p.is_file() and not {"__pycache__", ".pytest_cache"} & set(p.parts) and p.suffix != ".pyc"]
    for f in needed:
        assert f in files, f
    assert not [f for f in files if "__pycache__" in f or ".pytest_cache" in f]


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the apm-fast developers" in text


def test_pep621_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "apm-fast" and meta["version"] == apm_fast.__version__ == "0.1.0"
    assert meta["requires-python"] == ">=3.10" and meta["readme"] == "README.md"
    # an SPDX expression and the file it names (the table form is deprecated), which needs setuptools >= 77
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    floor = [re.fullmatch(r"setuptools\s*>=\s*(\d+).*", r) for r in requires]
    assert any(m and int(m.group(1)) >= 77 for m in floor), requires
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
    monkeypatch.delenv("APM_FAST_STRICT_BUILD", raising=False)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert "apm-fast build summary" in err
    assert "built:" in err and "the Python package apm_fast" in err and "Triton kernels" in err
    if torch.version.cuda is None:
        assert "NOT built: the CUDA extension apm_fast._C_cuda" in err and "CUDA build of torch" in err
    assert "name" not in seen and "version" not in seen, "metadata comes from pyproject.toml"
    # the data folder is a package of its own (setuptools warns of package data outside packages)
    assert {"apm_fast", "apm_fast.data", "apm_fast.kernels"} <= set(seen["packages"])


# ---------------------------------------------------------------- a failed or strict CUDA build
def _setup_copy(tmp_path):
    """setup.py and its build settings in a folder of their own (a run writes build/ there)."""
    work = tmp_path / "src"
    (work / "csrc").mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", work / "setup.py")
    shutil.copy(ROOT / "csrc" / "build_config.py", work / "csrc" / "build_config.py")
    return work


def _run_setup(monkeypatch, work, argv=("bdist_wheel",), *, cuda=False):
    """setup.py run as a build in ``work`` with setuptools.setup stubbed: (its keywords, its
    globals). ``cuda``: torch looks like a CUDA build with nvcc (the extension is configured)."""
    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setattr(sys, "argv", ["setup.py", *argv])
    if cuda:
        import torch.utils.cpp_extension as cpp_extension

        monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME or "/usr/local/cuda")
    monkeypatch.chdir(work)
    ns = runpy.run_path(str(work / "setup.py"), run_name="__main__")
    return seen, ns


@pytest.mark.parametrize("case", ["isolated", "cpu_torch", "skipped"])
def test_a_strict_build_fails_whenever_the_extension_is_not_built(monkeypatch, tmp_path, capsys, case):
    """APM_FAST_STRICT_BUILD=1 fails the install for every reason the extension is not built, not
    only when a compile starts and fails, naming the reason and the way out."""
    import torch.utils.cpp_extension as cpp_extension

    work = _setup_copy(tmp_path)
    monkeypatch.setenv("APM_FAST_STRICT_BUILD", "1")
    monkeypatch.setenv("APM_FAST_SKIP_CUDA_BUILD", "1" if case == "skipped" else "0")
    if case == "isolated":                  # pip's build isolation: no torch in the build environment
        monkeypatch.setitem(sys.modules, "torch", None)
    if case == "cpu_torch":
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(SystemExit) as info:
        _run_setup(monkeypatch, work, ("editable_wheel",))
    msg = str(info.value.code)
    assert msg.startswith("error: APM_FAST_STRICT_BUILD=1, but the CUDA extension apm_fast._C_cuda is not built")
    expected = {"isolated": "--no-build-isolation", "cpu_torch": "install a CUDA build of torch and the CUDA toolkit",
                "skipped": "APM_FAST_SKIP_CUDA_BUILD=1 (unset it"}[case]
    assert expected in msg, msg
    assert "NOT built: the CUDA extension" in capsys.readouterr().err, "the summary is printed still"


def test_without_strict_the_package_builds_without_the_extension(monkeypatch, tmp_path):
    work = _setup_copy(tmp_path)
    monkeypatch.delenv("APM_FAST_STRICT_BUILD", raising=False)
    monkeypatch.setenv("APM_FAST_SKIP_CUDA_BUILD", "0")
    monkeypatch.setitem(sys.modules, "torch", None)
    seen, ns = _run_setup(monkeypatch, work, ("editable_wheel",))
    assert seen["ext_modules"] == [] and not ns["SUMMARY"]["the CUDA extension apm_fast._C_cuda"][0]
    # metadata steps never fail, strict or not (pip runs them before the build)
    monkeypatch.setenv("APM_FAST_STRICT_BUILD", "1")
    seen, _ = _run_setup(monkeypatch, work, ("dist_info",))
    assert seen["ext_modules"] == []


def _build_ext_in_place(monkeypatch, tmp_path, compile_fn):
    """The build_ext command setup.py configures, run in place (as an editable install does) over a
    package folder holding a library of an earlier build, torch's compile replaced by
    ``compile_fn(cmd)``. Returns (the earlier library's path, setup.py's SUMMARY)."""
    import torch.utils.cpp_extension as cpp_extension
    from setuptools import Distribution

    work = _setup_copy(tmp_path)
    monkeypatch.setenv("APM_FAST_SKIP_CUDA_BUILD", "0")
    monkeypatch.setenv("APM_FAST_CUDA_ARCHS", "90a")
    seen, ns = _run_setup(monkeypatch, work, ("editable_wheel",), cuda=True)
    (ext,) = seen["ext_modules"]
    assert ext.name == "apm_fast._C_cuda"
    (work / "apm_fast").mkdir()
    (work / "apm_fast" / "__init__.py").write_text("")
    old = work / "apm_fast" / ("_C_cuda" + importlib.machinery.EXTENSION_SUFFIXES[0])
    old.write_bytes(b"a library built from older sources")
    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", lambda self: compile_fn(self))
    dist = Distribution({"name": "apm-fast", "packages": ["apm_fast"], "ext_modules": seen["ext_modules"],
                         "cmdclass": seen["cmdclass"]})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = 1
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()
    return old, ns["SUMMARY"]


def _compile_error(cmd):
    raise RuntimeError("Error compiling objects for extension")


@pytest.mark.parametrize("how", ["compile error", "no library made"])
def test_a_failed_cuda_build_warns_installs_and_drops_the_earlier_library(monkeypatch, tmp_path, how):
    """A failed build of the extension warns and the (editable) install goes on without it, and
    the library an earlier build left next to the sources is removed: it is of other sources."""
    monkeypatch.delenv("APM_FAST_STRICT_BUILD", raising=False)
    fail = _compile_error if how == "compile error" else (lambda cmd: None)   # e.g. a failed link
    with pytest.warns(UserWarning, match="the CUDA extension cannot be built.*installs without it"):
        old, summary = _build_ext_in_place(monkeypatch, tmp_path, fail)
    assert not old.exists()
    built, why = summary["the CUDA extension apm_fast._C_cuda"]
    assert not built and "its build failed" in why and "removed the earlier build" in why


@pytest.mark.parametrize("how", ["compile error", "no library made"])
def test_a_failed_cuda_build_fails_a_strict_install(monkeypatch, tmp_path, how):
    monkeypatch.setenv("APM_FAST_STRICT_BUILD", "1")
    fail = _compile_error if how == "compile error" else (lambda cmd: None)
    with pytest.raises(RuntimeError, match="Error compiling" if how == "compile error" else "no library was made"):
        _build_ext_in_place(monkeypatch, tmp_path, fail)
    assert not list((tmp_path / "src" / "apm_fast").glob("_C_cuda*")), "the earlier library is removed"


def test_a_successful_cuda_build_is_copied_next_to_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("APM_FAST_STRICT_BUILD", "1")

    def compile_ok(cmd):
        for e in cmd.extensions:
            out = Path(cmd.get_ext_fullpath(e.name))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"new library")

    _, summary = _build_ext_in_place(monkeypatch, tmp_path, compile_ok)
    built, detail = summary["the CUDA extension apm_fast._C_cuda"]
    assert built and "sm_90a" in detail
    (lib,) = (tmp_path / "src" / "apm_fast").glob("_C_cuda*")
    assert lib.read_bytes() == b"new library"


def test_the_install_stamp_depends_on_every_build_input(tmp_path):
    """`make` reinstalls (rebuilding the extension) when pyproject.toml, setup.py or any source of
    csrc/ changed, not only the requirements."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".apm-fast-installed"
    stamp.touch()
    cmd = [make, "--no-print-directory", "-C", str(ROOT), "-q", f"VENV={venv}", str(stamp)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0, "a fresh stamp is up to date"
    inputs = ["requirements.txt", "constraints.txt", "setup.py", "pyproject.toml", "csrc/build_config.py"]
    inputs += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*/*")) if p.is_file()]
    for f in inputs:
        assert subprocess.run(cmd + ["-W", f], capture_output=True).returncode == 1, f"{f} changed: no reinstall"


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


def test_ptx_of_an_arch_specific_target_is_refused_and_not_trusted(monkeypatch):
    """compute_90a PTX runs on sm_90 only: "90a+PTX" is refused at build time, naming the variable,
    and the run-time check never takes it for forward-compatible."""
    import importlib.util

    from apm_fast._ext import arch_runs_on

    spec = importlib.util.spec_from_file_location("bc", ROOT / "csrc" / "build_config.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("APM_FAST_CUDA_ARCHS", "80;90a+PTX")
    with pytest.raises(ValueError, match=r"^APM_FAST_CUDA_ARCHS: '90a\+PTX' .*compute_90a.*90a;90\+PTX"):
        bc.parse_archs()
    monkeypatch.delenv("APM_FAST_CUDA_ARCHS")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a+PTX")
    with pytest.raises(ValueError, match=r"^TORCH_CUDA_ARCH_LIST \(APM_FAST_CUDA_ARCHS unset\): '90a\+PTX'"):
        bc.parse_archs()
    assert bc.parse_archs("90a;90+PTX") == ["90a", "90+PTX"]
    assert arch_runs_on("90a+PTX", (9, 0))
    assert not arch_runs_on("90a+PTX", (10, 0)) and not arch_runs_on("90a+PTX", (9, 1))
    assert arch_runs_on("90+PTX", (10, 0)) and arch_runs_on("90+PTX", (12, 0))
    assert arch_runs_on("100f+PTX", (10, 3)) and not arch_runs_on("100f+PTX", (12, 0))


# ---------------------------------------------------------------- the commit of a record
def _git(cwd, *args) -> str:
    out = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                          "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _repo(path: Path, pyproject: str) -> Path:
    path.mkdir(parents=True)
    (path / "pyproject.toml").write_text(pyproject)
    _git(path, "init", "-q")
    _git(path, "add", "pyproject.toml")
    _git(path, "commit", "-q", "-m", "first")
    return path


def test_records_name_apm_fasts_commit_never_a_surrounding_repositorys(monkeypatch, tmp_path):
    """A wheel installed into a venv inside the user's own git repository: benchmark records must
    not name the user's commit as apm-fast's (it is unknown); apm-fast's own checkout gives its own."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    from apm_fast.bench import machine

    monkeypatch.delenv("APM_FAST_COMMIT", raising=False)
    user = _repo(tmp_path / "user", '[project]\nname = "their-project"\n')
    site = user / ".venv" / "lib" / "python3.11" / "site-packages"   # parents[2] of apm_fast/bench/machine.py
    site.mkdir(parents=True)
    for root in (site, user):
        monkeypatch.setattr(machine, "_REPO_ROOT", root)
        assert machine.git_commit() == "unknown", root
    own = _repo(tmp_path / "apm-fast", '[project]\nname = "apm-fast"\nversion = "0.1.0"\n')
    monkeypatch.setattr(machine, "_REPO_ROOT", own)
    head = _git(own, "rev-parse", "--short=12", "HEAD")
    assert machine.git_commit() == head
    (own / "pyproject.toml").write_text('[project]\nname = "apm-fast"\nversion = "0.2.0"\n')
    assert machine.git_commit() == head + "+dirty"
    monkeypatch.setenv("APM_FAST_COMMIT", "abc123")
    assert machine.git_commit() == "abc123"
    monkeypatch.delenv("APM_FAST_COMMIT")
    monkeypatch.setattr(machine, "_REPO_ROOT", tmp_path / "no-repo")
    assert machine.git_commit() == "unknown"
