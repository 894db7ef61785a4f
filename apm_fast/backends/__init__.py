"""One switch between implementations of the same APM function.

A backend is an object with ``name``, ``available() -> (bool, reason)`` and
``forward(model, images, *, want_grid=True, want_rgb=None) -> APMOutput`` (differentiable with
respect to the model's parameters). Backends register themselves here by name; the model asks
``get_backend(name)`` and never branches on devices itself. Modules that need optional
dependencies (Triton, the CUDA extension) are imported only when their backend is asked for.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

__all__ = ["register_backend", "get_backend", "available_backends", "default_backend_name",
           "BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run here; the message says what is missing and how to fix it."""


# name -> module that registers it on import (lazy, so `import apm_fast` needs no GPU stack)
_LAZY: Dict[str, str] = {
    "reference": "apm_fast.backends.reference",
    "torch": "apm_fast.backends.torch_rewrite",
    "triton": "apm_fast.backends.triton_backend",
    "cuda": "apm_fast.backends.cuda_backend",
}
_REGISTRY: Dict[str, object] = {}


def register_backend(backend, *, lazy_module: str | None = None):
    """Register a backend object (or, with ``lazy_module``, a module that registers ``backend``
    when imported; then ``backend`` is the name)."""
    if lazy_module is not None:
        _LAZY[str(backend)] = lazy_module
        return backend
    _REGISTRY[backend.name] = backend
    return backend


def _load(name: str):
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY:
        importlib.import_module(_LAZY[name])
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise ValueError(f"backend: unknown name {name!r}; expected one of {sorted(set(_LAZY) | set(_REGISTRY))}")


def get_backend(name: str | None = None, *, device=None, check: bool = True):
    """The backend called ``name`` (``None``: the default for ``device``). With ``check``, raise
    :class:`BackendUnavailable` naming what is missing when it cannot run here."""
    if name is None:
        name = default_backend_name(device)
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a name (str) or None, got {type(name).__name__}")
    backend = _load(name)
    if check:
        ok, reason = backend.available()
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available here: {reason}")
    return backend


def available_backends() -> Dict[str, str]:
    """Every known backend and either "available" or why not."""
    out = {}
    for name in sorted(set(_LAZY) | set(_REGISTRY)):
        try:
            ok, reason = _load(name).available()
        except Exception as exc:  # an optional dependency failing to import is a reason, not a crash
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        out[name] = "available" if ok else reason
    return out


_DEFAULT_ORDER_CUDA = ("cuda", "triton", "torch")


def default_backend_name(device=None) -> str:
    """``torch`` on the CPU; on a GPU the fastest backend that is available."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return "torch"
    for name in _DEFAULT_ORDER_CUDA:
        if name in _LAZY or name in _REGISTRY:
            try:
                ok, _ = _load(name).available()
            except Exception:
                ok = False
            if ok:
                return name
    return "torch"
