"""pytest-benchmark entries: one TTT step per implementation, the forward per backend, and the
chunked forward over growing numbers of location queries.

    pytest benchmarks/ --benchmark-only [--bench-preset ttt-l14] [--bench-device cuda] -rs

Implementations that are not there are reported as skipped with the reason (``-rs`` lists
them); every timed entry first passes the correctness gate.
"""
import pytest
import torch

from apm_fast.backends import get_backend
from apm_fast.bench.amp import autocast
from apm_fast.bench.chunked import chunked_forward
from apm_fast.bench.context import backend_status
from apm_fast.bench.gate import gate_step
from apm_fast.bench.machine import machine_line
from apm_fast.bench.sections.step import candidates
from apm_fast.bench.timing import synchronize

_BACKENDS = list(backend_status())
STEP_KEYS = (["authors", "eager", "compile"]
             + [k for n in _BACKENDS if n != "reference" for k in (n, f"{n}+graph")] + ["engine"])


def _require_gate(ctx, preset, path=None):
    gate = ctx.gate
    bad = [c for c in gate.checks if not c.passed and (path is None or c.path == path)]
    if bad or gate.errors:
        pytest.fail("correctness gate failed, nothing is timed: " + ", ".join(gate.failed_paths()))


def _timed(benchmark, ctx, fn, **info):
    def call():
        fn()
        synchronize(ctx.device)

    benchmark.extra_info.update(machine=machine_line(ctx.machine), **info)
    benchmark.pedantic(call, rounds=ctx.options.repeats, warmup_rounds=ctx.options.warmup,
                       iterations=1)


@pytest.mark.parametrize("key", STEP_KEYS)
def test_ttt_step(benchmark, bench_ctx, key):
    ctx = bench_ctx
    preset = ctx.options.presets[0]
    if not ctx.config(preset).pool:
        pytest.skip(f"{preset} has no pool: no TTT step")
    _require_gate(ctx, preset)
    cand = {c.key: c for c in candidates(ctx, preset)}.get(key)
    if cand is None or cand.factory is None:
        pytest.skip(f"{key}: {cand.status}: {cand.reason}" if cand else f"{key}: not a candidate here")
    model = ctx.model(preset)
    image = ctx.images(preset, 1)
    target = ctx.targets(model, image)
    impl = cand.factory(model, image, target)
    impl.prepare()
    gate_step(ctx.gate, preset, impl, ctx.points[preset])
    _require_gate(ctx, preset, key)
    _timed(benchmark, ctx, impl.step, preset=preset, implementation=cand.label,
           precision=impl.precision, gate="passed")


@pytest.mark.parametrize("mode", ["grid", "pooled"])
@pytest.mark.parametrize("batch", ["one", "many"])
@pytest.mark.parametrize("backend", _BACKENDS)
def test_forward(benchmark, bench_ctx, backend, batch, mode):
    ctx = bench_ctx
    preset = ctx.options.presets[0]
    status = ctx.backends[backend]
    if status != "available":
        pytest.skip(f"{backend}: absent: {status}")
    if mode == "pooled" and not ctx.config(preset).pool:
        pytest.skip(f"{preset} has no pool")
    _require_gate(ctx, preset, backend)
    b = 1 if batch == "one" else max(ctx.options.forward_batches)
    model = ctx.model(preset).eval()
    images = ctx.images(preset, b, offset=200)
    impl = get_backend(backend, device=ctx.device)

    def fn():
        with torch.inference_mode(), autocast(ctx.device, ctx.amp_dtype):
            impl.forward(model, images, want_grid=(mode == "grid"), want_rgb=False)

    _timed(benchmark, ctx, fn, preset=preset, backend=backend, batch=b, mode=mode)


@pytest.mark.parametrize("index", [0, -1])
def test_scaling_apm(benchmark, bench_ctx, index):
    ctx = bench_ctx
    o = ctx.options
    g = o.scaling_grids[index]
    _require_gate(ctx, o.presets[0])
    torch.manual_seed(0)
    from apm_fast.model import APM

    model = APM(ctx.config(o.scaling_preset, gate=False), device=ctx.device).eval()
    cfg = model.config
    image = torch.randn(1, cfg.in_chans, cfg.image_size, cfg.image_size, device=ctx.device)

    def fn():
        with torch.inference_mode(), autocast(ctx.device, ctx.amp_dtype):
            chunked_forward(model, image, query_grid=g, chunk=o.scaling_chunk)

    _timed(benchmark, ctx, fn, queries=g * g, chunk=o.scaling_chunk)
