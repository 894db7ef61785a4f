"""The machine line printed above every table and stored in every JSON: what ran, where, how."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["machine_info", "machine_line", "device_slug", "git_commit"]

# the checkout of apm-fast this file lies in, if it lies in one (an editable install or a run
# from the sources); an installed wheel's parents[2] is some site-packages' parent instead
_REPO_ROOT = Path(__file__).resolve().parents[2]
_PROJECT_NAME = re.compile(r'^name\s*=\s*["\']apm-fast["\']\s*(#.*)?$', re.MULTILINE)


def _run(cmd, cwd=None, timeout=10) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _is_apm_fast_checkout(root: Path) -> bool:
    """Whether ``root`` is the top of a git checkout of apm-fast itself: not a folder inside some
    other repository (a venv, with apm-fast installed from a wheel, inside a user's project)."""
    top = _run(["git", "-C", str(root), "rev-parse", "--show-toplevel"])
    if top is None:
        return False
    try:
        if Path(top).resolve() != Path(root).resolve():
            return False
        text = (Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    project = text.split("[project]", 1)[1] if "[project]" in text else ""
    project = re.split(r"^\[", project, maxsplit=1, flags=re.MULTILINE)[0]   # that table only
    return _PROJECT_NAME.search(project) is not None


def git_commit() -> str:
    """``APM_FAST_COMMIT`` from the environment when set (a tree copied without its ``.git``), else
    the commit of the apm-fast checkout this package runs from (with ``+dirty`` when tracked files
    differ), else "unknown" (an installed wheel: never the commit of a repository it lies in)."""
    env = os.environ.get("APM_FAST_COMMIT")
    if env:
        return env
    if not _is_apm_fast_checkout(_REPO_ROOT):
        return "unknown"
    head = _run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_REPO_ROOT)
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT)
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _driver_version() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # absent or broken: the line says so rather than failing the run
        return None
    return getattr(triton, "__version__", None)


def machine_info(device, dtype: str) -> dict:
    """Everything needed to compare two result files: device, versions, commit and compute dtype."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "gpu": None,
        "gpu_memory_gb": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "dtype": dtype,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["driver"] = _driver_version()
    return info


def machine_line(info: dict) -> str:
    where = info["gpu"] or f"CPU {info['cpu']} ({info['cpu_threads']} threads)"
    parts = [where]
    if info.get("gpu"):
        parts.append(f"driver {info.get('driver') or '?'}")
        parts.append(f"CUDA {info.get('cuda') or '?'}")
    parts += [f"torch {info['torch']}", f"triton {info.get('triton') or 'absent'}",
              f"commit {info['commit']}", f"dtype {info['dtype']}"]
    return " | ".join(parts)


def device_slug(info: dict) -> str:
    """Folder name for a machine's results: the GPU's name, or ``cpu-<model>``."""
    name = info["gpu"] if info.get("gpu") else "cpu-" + info["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"
