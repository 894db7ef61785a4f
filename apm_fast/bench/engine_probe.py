"""Where the benchmark looks for the GPU TTT engine, in one place.

The engine is optional: when what is looked for here is missing the benchmark lists the engine's
rows as *absent* with the reason below, and picks them up as soon as they exist.

What is looked for:

* a graph-captured single step: ``apm_fast.engine.make_step(model, image, target, *, backend,
  lr, betas, eps)`` returning ``step`` where ``step()`` runs one TTT step (forward, backward,
  Adam) and returns the loss tensor, and ``step.reset()`` puts weights and optimizer state back
  to the values at ``make_step`` time;
* students side by side: ``apm_fast.engine.TTTEngine(model, steps=, lr=, backend=,
  students=)`` with ``.fit(images, targets)`` returning an object with ``.cls`` (B x D), like
  :class:`apm_fast.TestTimeTrainer`.
"""
from __future__ import annotations

import importlib

__all__ = ["ENGINE_MODULE", "find_step_factory", "find_side_by_side"]

ENGINE_MODULE = "apm_fast.engine"
STEP_ATTR = "make_step"
SIDE_BY_SIDE_ATTR = "TTTEngine"


def _engine_module():
    try:
        return importlib.import_module(ENGINE_MODULE), ""
    except ModuleNotFoundError as exc:
        if exc.name and ENGINE_MODULE.startswith(exc.name):
            return None, f"{ENGINE_MODULE} is not in this version of the package"
        return None, f"{ENGINE_MODULE} failed to import: {exc}"
    except Exception as exc:  # a broken optional module is a reason, not a crash
        return None, f"{ENGINE_MODULE} failed to import: {type(exc).__name__}: {exc}"


def _find(attr):
    mod, why = _engine_module()
    if mod is None:
        return None, why
    obj = getattr(mod, attr, None)
    if obj is None or not callable(obj):
        return None, f"{ENGINE_MODULE}.{attr} not found"
    return obj, ""


def find_step_factory():
    """(make_step, "") or (None, why it is absent)."""
    return _find(STEP_ATTR)


def find_side_by_side():
    """(TTTEngine, "") or (None, why it is absent)."""
    return _find(SIDE_BY_SIDE_ATTR)
