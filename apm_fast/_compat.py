"""Make ``torchvision`` (hence ``open_clip``) importable next to a torch it was not built for.

Why: a CUDA build of torchvision installed beside a CPU build of torch cannot load its C++
library, and then ``import torchvision`` dies in its own module body with
``RuntimeError: operator torchvision::nms does not exist`` (it registers a fake kernel for an
operator whose schema only its C++ library would have defined). Defining the two missing schemas
(``nms`` and ``qnms``) first lets it import: its Python transforms work, its C++ ops do not (the
package never needs them).

The guard is applied only where needed: torchvision's own library is given the chance to load
first (exactly as ``import torchvision`` would), and the schemas are defined only if they are
still missing afterwards. Where torchvision is healthy, nothing is registered.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys

__all__ = ["ensure_torchvision_importable", "import_open_clip", "TeacherDependencyError"]

# The schemas that torchvision's Python code refers to at import time (torchvision/_meta_registrations).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# torch.library.Library unregisters its definitions when garbage-collected: keep it alive.
_LIBRARY = None


class TeacherDependencyError(ImportError):
    """An optional dependency of the teachers (open_clip) is missing or cannot be imported."""


def _has_schema(qualname: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def _try_load_torchvision_library(spec) -> None:
    """Load torchvision's C++ library the way its ``extension`` module does; failure is silent."""
    import torch

    for location in spec.submodule_search_locations or ():
        finder = importlib.machinery.FileFinder(
            location, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        ext = finder.find_spec("_C")
        if ext is not None and ext.origin:
            try:
                torch.ops.load_library(ext.origin)
            except (ImportError, OSError):
                pass  # the mismatched build this guard exists for
            return


def ensure_torchvision_importable() -> bool:
    """Define the missing ``torchvision::nms``/``qnms`` schemas if torchvision cannot provide them.

    Returns True when the schemas had to be defined here, False when nothing was needed
    (torchvision already imported, not installed, or healthy).
    """
    global _LIBRARY
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return False
    _try_load_torchvision_library(spec)
    missing = [name for name in _SCHEMAS if not _has_schema(f"torchvision::{name}")]
    if not missing:
        return False
    import torch

    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIBRARY.define(_SCHEMAS[name])
    return True


def import_open_clip():
    """``import open_clip`` after applying the guard above; a clear error if it is not installed."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    if importlib.util.find_spec("open_clip") is None:
        raise TeacherDependencyError(
            "open_clip is not installed; the CLIP teachers need it: "
            "pip install open_clip_torch (or pip install 'apm-fast[clip]')")
    ensure_torchvision_importable()
    try:
        return importlib.import_module("open_clip")
    except ImportError as exc:
        raise TeacherDependencyError(f"open_clip is installed but failed to import: {exc}") from exc
