"""One switch between implementations of the same APM function.

``reference`` is the plain form of the model (``apm_fast.reference``: every column materialized,
``nn.MultiheadAttention``), the oracle. Every other backend is a *table* of primitives
(``apm_fast.ops.contract``) run through the one driver: ``torch`` (plain PyTorch), ``triton``
(``apm_fast.kernels``) and ``cuda`` (the CUDA C++ extension of ``csrc/``). :data:`TABLES` maps each
name to a factory; a table's module is imported only when it is asked for, so ``import
apm_fast`` needs no GPU stack, and nothing registers itself on import.
"""
from __future__ import annotations

from typing import Callable, Dict

__all__ = ["BACKENDS", "TABLES", "BackendUnavailable", "get_backend", "available_backends", "default_backend",
           "explain_default"]


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run here; the message says what is missing and how to fix it."""


def _torch():
    from ..ops.contract import TorchPrimitives
    return TorchPrimitives()


def _triton():
    from .triton import TritonPrimitives
    return TritonPrimitives()


def _cuda():
    from .cuda import CudaPrimitives
    return CudaPrimitives()


# name -> factory of the table (called once per process); a new table is one more entry
TABLES: Dict[str, Callable[[], object]] = {"torch": _torch, "triton": _triton, "cuda": _cuda}
BACKENDS = ("reference",) + tuple(TABLES)   # the package's own
_MADE: Dict[str, object] = {}


def _table(name: str):
    if name not in _MADE:
        _MADE[name] = TABLES[name]()
    return _MADE[name]


def _status(name: str):
    """(ok, why not) for a backend name."""
    if name == "reference":
        return True, ""
    try:
        ok, why = _table(name).available()
        if ok and name == "cuda":
            # built for other GPUs: say so now, not "no kernel image is available" at the first call
            from .._ext import device_problem

            problem = device_problem()
            if problem:
                return False, problem
        return ok, why
    except Exception as exc:  # an optional dependency failing to import is a reason, not a crash
        return False, f"{type(exc).__name__}: {exc}"


def explain_default(device=None, config=None, workload: str = "ttt_step"):
    """(the default table for ``device``, a model ``config`` and a ``workload``, why): ``torch`` on
    the CPU; on a GPU the available table measured fastest on this GPU model for this preset and
    workload, else by the rules of :mod:`apm_fast.backends.measured` (the sum over the measured
    presets, the fixed order), the reason saying which: ``"ttt_step"`` (training: the TTT trainer and
    engine, the other training loops) or ``"forward"`` (inference, ``model(x)``)."""
    import torch

    from .measured import check_workload, choose

    check_workload(workload)
    if device is None or torch.device(device).type != "cuda":
        return "torch", "on the CPU: the other tables are GPU kernels"
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device if device.index is not None else None)
    return choose(gpu, config, [n for n in TABLES if _status(n)[0]], workload)


def default_backend(device=None, config=None, workload: str = "ttt_step") -> str:
    """``torch`` on the CPU; on a GPU the table :func:`explain_default` chooses for the workload."""
    return explain_default(device, config, workload)[0]


def get_backend(name: str | None = None, *, device=None, check: bool = True, config=None,
                workload: str = "ttt_step"):
    """The table called ``name`` (``None``: the default for ``device``, ``config`` and
    ``workload``). ``"reference"`` is the plain form and has no table: asking for it here is an
    error. With ``check``, raise :class:`BackendUnavailable` naming what is missing when the table
    cannot run here."""
    if name is None:
        name = default_backend(device, config, workload)
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a name (str) or None, got {type(name).__name__}")
    if name == "reference":
        raise ValueError("backend: 'reference' is the plain form of the model and has no primitive "
                         f"table; expected one of {list(TABLES)}")
    if name not in TABLES:
        raise ValueError(f"backend: unknown name {name!r}; expected one of {['reference', *TABLES]}")
    if check:
        ok, reason = _status(name)
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available here: {reason}")
    return _table(name)


def resolve_backend(name: str | None, device=None, config=None, workload: str = "ttt_step") -> str:
    """The name a call runs with: ``name`` checked (known and available), or the default for the
    device, the model's ``config`` and the ``workload`` (``"ttt_step"``: training, the default;
    ``"forward"``: inference)."""
    if name is None:
        return default_backend(device, config, workload)
    if name != "reference":
        get_backend(name, device=device)
    return name


def available_backends() -> Dict[str, str]:
    """Every backend and either "available" or why not."""
    out = {}
    for name in ("reference", *TABLES):
        ok, reason = _status(name)
        out[name] = "available" if ok else reason
    return out
