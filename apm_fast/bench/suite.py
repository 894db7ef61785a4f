"""One benchmark run: the gate, then the sections, then tables, JSON files and plots.

A section that fails is recorded as an error in its JSON and the others still run; JSON files are
written after every section (marked ``partial``) and rewritten at the end, when the gate's verdict
is final, so a run cut short still leaves its results behind.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import spec_numbers
from .context import Context, error_text
from .flops import FLOPS_CONVENTION
from .gate import ReferencePoint, gate_backend
from .machine import device_slug, machine_line
from .options import OPTIONAL_SECTIONS, SECTIONS, BenchOptions
from .report import finalize, format_gate, format_section
from .sections import SECTION_MODULES

__all__ = ["run_suite", "SuiteResult", "results_dir", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class SuiteResult:
    context: Context
    sections: Dict[str, dict]
    out_dir: Optional[Path]
    files: List[Path] = field(default_factory=list)
    plots: List[Path] = field(default_factory=list)

    @property
    def gate_passed(self) -> bool:
        return self.context.gate.passed


def results_dir(options: BenchOptions, machine: dict) -> Optional[Path]:
    """``<out>/<gpu-or-cpu-name>/`` (None when results are not to be written)."""
    if not options.out:
        return None
    return Path(options.out) / device_slug(machine)


def _jsonable(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _gate_inputs(ctx, preset):
    model = ctx.model(preset)
    images = torch.cat([ctx.images(preset, 1), ctx.images(preset, 1, offset=1)])
    target = ctx.targets(model, images[:1]) if model.config.pool else None
    return model, images, target


def run_gate(ctx: Context):
    """Every backend's forward and gradients against the float64 reference, for every preset.
    (The step implementations are checked in the step section, right after they are built.)"""
    o = ctx.options
    for preset in o.presets:
        try:
            model, images, target = _gate_inputs(ctx, preset)
            point = ReferencePoint.compute(model, images, target, lr=o.lr)
            ctx.points[preset] = point.cpu()
        except Exception as exc:
            ctx.gate.error(preset, "reference", exc)
            ctx.log(f"  {preset}: reference failed: {error_text(exc)}")
            continue
        for name, status in ctx.backends.items():
            if status != "available":
                ctx.log(f"  {preset:8s} {name:10s} absent: {ctx.said(status)}")
                continue
            if ctx.skipped(name):
                continue
            try:
                gate_backend(ctx.gate, preset, name, model, images, target, point, ctx.amp_dtype)
            except Exception as exc:
                ctx.gate.error(preset, name, exc)
        del model, images, point


def _carries_flops(x) -> bool:
    """Whether a section's result holds FLOP counts or rates: a key naming FLOPs (``flops``,
    ``tflops``, ``step_flops``...) or a rate unit in FLOP/s, anywhere in it."""
    if isinstance(x, dict):
        return any("flops" in str(k).lower() or _carries_flops(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return any(_carries_flops(v) for v in x)
    return isinstance(x, str) and x.endswith("FLOP/s")


def _document(ctx, name, result, *, partial, started):
    o = ctx.options
    convention = {"flops_convention": FLOPS_CONVENTION} if _carries_flops(result.get("rows", [])) else {}
    return _jsonable({
        "schema": SCHEMA_VERSION, "suite": name, "partial": partial, "quick": o.quick,
        "started": started, "machine": ctx.machine, "machine_line": machine_line(ctx.machine),
        "backends": ctx.backends, "gate": ctx.gate.to_dict(), "options": _options(o),
        "spec_h100": spec_numbers.as_dict(), **convention, **result})


def _options(o) -> dict:
    """The run's options as recorded: the output folder by its name only (a result file carries
    no path of the machine that wrote it)."""
    d = o.to_dict()
    if d.get("out"):
        d["out"] = Path(d["out"]).name
    return d


def _write(path: Path, doc: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def _plot(path: Path, log):
    try:
        from .plots import plot_file

        return plot_file(path)
    except Exception as exc:  # a plot must never cost the results
        log(f"plot of {path.name} failed: {error_text(exc)}")
        return None


def run_suite(options: BenchOptions, log: Callable[[str], None] = print) -> SuiteResult:
    if _rank() != 0:                 # under torchrun only rank 0 prints and writes
        options, log = options.replace(out=None, plots=False), (lambda line: None)
    ctx = Context(options, log)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_dir = results_dir(options, ctx.machine)
    suffix = "-quick" if options.quick else ""
    log(machine_line(ctx.machine))
    for name, status in ctx.backends.items():
        log(f"backend {name}: {status}")

    log("== correctness gate")
    t0 = time.perf_counter()
    run_gate(ctx)
    gate_seconds = time.perf_counter() - t0

    results: Dict[str, dict] = {}
    for sec in SECTIONS + OPTIONAL_SECTIONS:
        if sec not in options.sections:
            continue
        mod = SECTION_MODULES[sec]
        log(f"== {mod.NAME}")
        t = time.perf_counter()
        try:
            res = mod.run(ctx)
        except Exception as exc:  # recorded; the remaining sections still run
            res = {"rows": [], "error": error_text(exc)}
            log(f"  section {mod.NAME} failed: {res['error']}")
        res["seconds"] = round(time.perf_counter() - t, 3)
        results[mod.NAME] = res
        if out_dir is not None:
            doc = _document(ctx, mod.NAME, finalize(mod.NAME, dict(res), ctx.gate), partial=True,
                            started=started)
            path = out_dir / f"{mod.NAME}{suffix}.json"
            _write(path, doc)
            if options.plots:      # drawn now too, so that a run cut short still has its plots
                _plot(path, log)

    suite = SuiteResult(ctx, results, out_dir)
    log("")
    for line in format_gate(ctx.gate):
        log(line)
    if ctx.device.type != "cuda":
        log("note: CPU timings move with the machine's load and its other jobs; the speedups below are "
            "indicative only (a GPU run is the measurement)")
    for name, res in results.items():
        finalize(name, res, ctx.gate)
        log("")
        log(f"== {name} ({res['seconds']:.1f} s)  {machine_line(ctx.machine)}")
        if res.get("error"):
            log(f"  section failed: {res['error']}")
        for line in format_section(name, res):
            log(line)
        if out_dir is not None:
            path = out_dir / f"{name}{suffix}.json"
            _write(path, _document(ctx, name, res, partial=False, started=started))
            suite.files.append(path)
    if out_dir is not None:
        from .targets import collect, markdown

        doc = collect(results, ctx.gate.passed, ctx.machine.get("commit"), machine_line(ctx.machine))
        _write(out_dir / f"targets{suffix}.json", doc)
        (out_dir / f"targets{suffix}.md").write_text(markdown(doc))
        log("")
        log(markdown(doc).rstrip())
        path = out_dir / f"gate{suffix}.json"
        _write(path, _document(ctx, "gate", {"seconds": round(gate_seconds, 3)}, partial=False,
                               started=started))
        suite.files.append(path)
        if options.plots:
            try:
                from .plots import plot_dir
                suite.plots = plot_dir(out_dir, warn=log)
                for p in suite.plots:
                    log(f"plot: {p}")
            except Exception as exc:
                log(f"plots failed: {error_text(exc)}")
        log(f"results: {out_dir}")
    return suite
