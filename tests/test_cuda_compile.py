"""Compile checks of the CUDA code without a GPU.

* Every kernel file (csrc/cuda/*.cu) is compiled by nvcc for sm_90a with the flags of the real
  build (csrc/build_config.py) and the CUTLASS headers; ptxas must not report serialized wgmma
  (warning C7510: a call inside the wgmma pipeline, a large slowdown).
* The CUDA bindings (csrc/torch/cuda_*.cpp) are compiled by the host compiler against this
  machine's (CPU) torch: only one generated header is missing from CPU wheels, stood in for by
  tests/cuda_stub_include. They cannot be linked here (no CUDA torch libraries), but every symbol
  of the extension's own namespaces that one object needs must be defined by another (a signature
  drift between a declaration and its definition would otherwise show only at import on the GPU).

Compiles run in parallel, longest first. A file whose inputs (every file of csrc/, the flags, the
compiler versions) are unchanged since its last successful check is not recompiled: its object is
kept under build/compile-check/, named by their hash.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "compile-check"
STUB_INCLUDE = Path(__file__).resolve().parent / "cuda_stub_include"


def _build_config():
    spec = importlib.util.spec_from_file_location("apm_fast_build_config", ROOT / "csrc" / "build_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CFG = _build_config()


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.is_file() else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (on PATH, $CUDA_HOME/bin or /usr/local/cuda/bin): "
                                                     "the CUDA compile check needs the CUDA toolkit")


def _version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cuda_include_dirs():
    """CUDA's own include directories, as nvcc reports them (for the host-compiled bindings)."""
    out = subprocess.run([NVCC, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            for tok in line.split("INCLUDES=", 1)[1].replace('"', " ").split():
                if tok.startswith("-I"):
                    dirs.append(tok[2:])
    return dirs


def _fingerprint(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted((ROOT / "csrc").rglob("*")):
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp", ".py"):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:24]


def _run_cached(name: str, cmd: list[str], key_extra: str):
    """(returncode, output, object) of cmd + ["-o", object]; the object is reused when the same
    inputs passed before (a failed or C7510 run leaves no object behind)."""
    key = _fingerprint(key_extra + "\n" + " ".join(cmd))
    obj = CACHE / f"{name.replace('/', '_')}.{key}.o"
    if obj.exists():
        return 0, "cached", obj
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = obj.with_suffix(".tmp")
    proc = subprocess.run(cmd + ["-o", str(tmp)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and "C7510" not in out:
        for stale in CACHE.glob(name.replace("/", "_") + ".*.o"):  # older versions of this file
            stale.unlink(missing_ok=True)
        tmp.replace(obj)
    else:
        tmp.unlink(missing_ok=True)
    return proc.returncode, out, obj


def _kernel_jobs():
    cutlass = CFG.cutlass_include_dir()
    if cutlass is None:
        pytest.fail("CUTLASS headers not found: `pip install --no-deps nvidia-cutlass==4.2.0.0` (make test "
                    "installs it) or set APM_FAST_CUTLASS_INCLUDE", pytrace=False)
    flags = CFG.nvcc_flags(["90a"], cutlass)
    versions = _version([NVCC, "--version"]) + cutlass
    jobs = {}
    for src in CFG.cuda_kernel_sources():
        jobs[src] = ([NVCC, "-c", *flags, "-Icsrc/cuda", src], versions)
    return jobs


def _glue_jobs():
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                 f"-I{STUB_INCLUDE}"] + [f"-I{d}" for d in _cuda_include_dirs()]
    versions = _version([cxx, "--version"]) + _version([sys.executable, "-c", "import torch;print(torch.__version__)"])
    jobs = {}
    for src in CFG.CUDA_GLUE_SOURCES:
        cmd = [cxx, "-std=c++17", "-c", "-O0", "-fPIC", "-w", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=_C_cuda", *inc, src]
        jobs[src] = (cmd, versions)
    return jobs


@pytest.fixture(scope="module")
def compile_results():
    """{source: (returncode, output, object)} of every check, run in parallel, CUTLASS files first."""
    jobs = {**_kernel_jobs(), **_glue_jobs()}
    order = sorted(jobs, key=lambda s: (0 if "sm90_" in s else 1 if s.endswith(".cu") else 2, s))
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(workers) as pool:
        futs = {s: pool.submit(_run_cached, s, *jobs[s]) for s in order}
        return {s: f.result() for s, f in futs.items()}


@needs_nvcc
@pytest.mark.parametrize("src", CFG.cuda_kernel_sources())
def test_kernel_compiles_for_sm90a(compile_results, src):
    rc, out, _ = compile_results[src]
    assert rc == 0, f"nvcc failed on {src}:\n{out[-6000:]}"
    assert "C7510" not in out, f"ptxas serialized the wgmma pipeline in {src} (a call inside it):\n{out[-3000:]}"


@needs_nvcc
@pytest.mark.parametrize("src", CFG.CUDA_GLUE_SOURCES)
def test_cuda_bindings_compile(compile_results, src):
    rc, out, _ = compile_results[src]
    assert rc == 0, f"the host compiler failed on {src}:\n{out[-6000:]}"


@needs_nvcc
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not found")
def test_extension_symbols_resolve(compile_results):
    """Every apm:: / apm_glue:: symbol an object of the CUDA extension uses is defined by one."""
    objs = [str(o) for rc, _, o in compile_results.values() if rc == 0]
    if len(objs) != len(compile_results):
        pytest.skip("some files did not compile (see the failures above)")

    def symbols(flag):
        out = subprocess.run(["nm", "-C", flag, *objs], capture_output=True, text=True, check=True).stdout
        names = set()
        for line in out.splitlines():
            parts = line.split(maxsplit=2) if flag == "--defined-only" else line.split(maxsplit=1)
            if flag == "--defined-only" and len(parts) == 3 and parts[1] in "TW":
                names.add(parts[2])
            elif flag == "-u" and len(parts) == 2 and parts[0] == "U":
                names.add(parts[1])
        return names

    ours = {s for s in symbols("-u") if s.startswith(("apm::", "apm_glue::"))}
    assert ours, "expected the bindings to call into the kernels"
    missing = sorted(ours - symbols("--defined-only"))
    assert not missing, "declared and used but defined nowhere (signature drift?):\n" + "\n".join(missing)


def test_every_kernel_file_is_checked():
    """The build and this check take the same list: every .cu of csrc/cuda."""
    srcs = CFG.cuda_kernel_sources()
    assert srcs and all(s.endswith(".cu") for s in srcs)
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert srcs == on_disk


def test_arch_flags():
    assert CFG.parse_archs("90a;80") == ["90a", "80"]
    assert CFG.parse_archs(" 90a, 80 ") == ["90a", "80"]
    with pytest.raises(ValueError, match=r"expected entries like 90a, 80 or 80\+PTX, got 'sm_90'"):
        CFG.parse_archs("sm_90")
    flags = CFG.nvcc_flags(["90a", "80"], "/inc")
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-DAPM_FAST_SM90A" in flags and "-DNDEBUG" in flags and "-I/inc" in flags
    no_cutlass = CFG.nvcc_flags(["80"], None)
    assert "-DAPM_FAST_NO_CUTLASS" in no_cutlass and "-DAPM_FAST_SM90A" not in no_cutlass
