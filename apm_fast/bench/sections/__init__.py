"""The benchmark's sections, in the order they run (after the gate). Each module has ``NAME``
(its JSON file's name) and ``run(ctx) -> dict`` with at least ``rows`` (and ``columns`` for the
generic printed table)."""
from . import ab, capabilities, distributed, engine, evaluation, forward, primitives, scaling, step, table4, throughput

# option name (--only) -> module
SECTION_MODULES = {
    "step": step,
    "throughput": throughput,
    "forward": forward,
    "scaling": scaling,
    "table4": table4,
    "primitives": primitives,
    "engine": engine,
    "distributed": distributed,
    "evaluation": evaluation,
    "capabilities": capabilities,
    "ab": ab,
}

__all__ = ["SECTION_MODULES"]
