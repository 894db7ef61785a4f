"""pytest-benchmark front door of the benchmark suite (``pytest benchmarks/``).

The entries share :mod:`apm_fast.bench` with ``apm-fast bench``: the same step implementations,
the same correctness gate (run once per session before anything is timed), the same sizes.
Options: ``--bench-preset`` (default ttt-l14), ``--bench-device`` (default cuda when available),
``--bench-full`` (full sizes on the CPU too).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be on before any kernel is defined (same as tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    g = parser.getgroup("apm-fast bench")
    g.addoption("--bench-preset", default="ttt-l14", help="preset to benchmark (default: ttt-l14)")
    g.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    g.addoption("--bench-full", action="store_true", help="full sizes even on the CPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


@pytest.fixture(scope="session")
def bench_ctx(request):
    from apm_fast.bench.context import Context
    from apm_fast.bench.options import BenchOptions
    from apm_fast.bench.suite import run_gate

    device = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = request.config.getoption("--bench-preset")
    kw = dict(device=device, presets=(preset,), out=None, plots=False)
    quick = torch.device(device).type == "cpu" and not request.config.getoption("--bench-full")
    options = BenchOptions.quick_defaults(**kw, compile_presets=(preset,)) if quick else BenchOptions(**kw)
    ctx = Context(options, log=lambda s: None)
    run_gate(ctx)
    return ctx
