"""The apm-fast benchmark suite: one harness behind ``apm-fast bench``, ``python -m
apm_fast.bench`` and the pytest-benchmark entries of ``benchmarks/``.

A run starts with a correctness gate (every fast path against the float64 reference), then
measures the sections of :data:`SECTIONS`, prints tables with the machine line, writes JSON under
``<out>/<gpu-or-cpu-name>/`` and draws plots from it (:mod:`apm_fast.bench.plots`).
Nothing here is imported by ``import apm_fast``.
"""
from .options import SECTIONS, BenchOptions, quick_config
from .suite import SuiteResult, run_suite
from .timing import MIN_REPEATS, Timing, measure

__all__ = ["SECTIONS", "BenchOptions", "quick_config", "SuiteResult", "run_suite", "MIN_REPEATS",
           "Timing", "measure"]
