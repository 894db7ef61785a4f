"""(a) One TTT step at B = 1 for each TTT preset, every implementation side by side.

Each implementation is built, prepared (compiled / captured), checked by the gate (its first step
from the initial weights against the float64 reference) and then timed, inside one peak-memory
window: the peak covers its own copy of the weights, gradients, optimizer state and activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..context import error_text, free_memory
from ..flops import apm_flops
from ..gate import gate_step
from ..steps import AuthorsStyleStep, CompiledStep, EagerStep, EngineStep, GraphStep
from ..timing import measure, peak_memory

__all__ = ["run", "NAME", "Candidate", "candidates"]

NAME = "ttt_step"


@dataclass
class Candidate:
    key: str
    label: str
    backend: Optional[str]
    form: str                                  # which FLOP count the implementation performs
    factory: Optional[Callable] = None         # (model, image, target) -> StepImpl
    status: str = "ok"                         # ok | absent | skipped
    reason: str = ""
    copies: int = 1


def candidates(ctx, preset):
    """Every implementation of the step, in table order; those that cannot run here carry
    their status and reason."""
    o = ctx.options
    kw = dict(lr=o.lr, amp_dtype=ctx.amp_dtype)
    cuda = ctx.device.type == "cuda"
    out = []

    def add(c: Candidate):
        if c.factory is not None and ctx.skipped(c.key):
            c.factory, c.status, c.reason = None, "skipped", "excluded by --skip"
        out.append(c)

    authors = Candidate("authors", AuthorsStyleStep.label, "reference", "plain", copies=o.authors_copies)
    if o.authors_presets is not None and preset not in o.authors_presets:
        authors.status = "skipped"
        authors.reason = (f"runs at {', '.join(o.authors_presets) or 'no preset'} only in this run "
                          "(time budget; --authors-presets to change)")
    else:
        authors.factory = lambda m, i, t: AuthorsStyleStep(
            m, i, t, copies=o.authors_copies, chunk=o.authors_chunk, lr=o.lr)
    add(authors)

    add(Candidate("eager", "plain eager PyTorch (reference backend" + (", fused Adam)" if cuda else ")"),
                  "reference", "plain", factory=lambda m, i, t: EagerStep(m, i, t, backend="reference", **kw)))

    comp = Candidate("compile", "torch.compile(plain eager)", "reference", "plain")
    if o.compile_presets is not None and preset not in o.compile_presets:
        comp.status = "skipped"
        comp.reason = (f"runs at {', '.join(o.compile_presets) or 'no preset'} only in this run "
                       "(compile time; --compile-presets to change)")
    else:
        comp.factory = lambda m, i, t: CompiledStep(m, i, t, backend="reference", **kw)
    add(comp)

    for name, status in ctx.fast_backends():   # every table: eager, whole step graph-captured, engine
        row = [Candidate(name, f"{name} backend, eager", name, "rewritten"),
               Candidate(f"{name}+graph", f"{name} backend, CUDA graph", name, "rewritten"),
               Candidate(f"engine/{name}", f"engine, {name} table, graph-captured step", name, "rewritten")]
        kinds = (EagerStep, GraphStep, EngineStep)
        for c, kind in zip(row, kinds):
            if status != "available":
                c.status, c.reason = "absent", status
            elif kind is not EagerStep and not cuda:
                c.status, c.reason = "absent", "CUDA graphs need a CUDA device"
            elif ctx.skipped(name):
                c.status, c.reason = "skipped", "excluded by --skip"
            else:
                c.factory = (lambda k, n: lambda m, i, t: k(m, i, t, backend=n, **kw))(kind, name)
            add(c)
    return out


def _row(preset, c: Candidate) -> dict:
    return {"preset": preset, "key": c.key, "label": c.label, "backend": c.backend,
            "status": c.status, "reason": c.reason, "form": c.form, "copies": c.copies}


def run(ctx) -> dict:
    o = ctx.options
    rows = []
    for preset in o.ttt_presets():
        cfg = ctx.config(preset)
        model = ctx.model(preset)
        image = ctx.images(preset, 1)
        target = ctx.targets(model, image)
        point = ctx.points.get(preset)
        flops = {f: apm_flops(cfg, form=f)["step"] for f in ("plain", "rewritten")}
        for c in candidates(ctx, preset):
            row = _row(preset, c)
            rows.append(row)
            late = ctx.out_of_time()
            if c.factory is not None and late:
                row.update(status="skipped", reason=late)
            if row["status"] != "ok":
                ctx.log(f"  {preset:8s} {c.key:14s} {row['status']}: {ctx.said(row['reason'])}")
                continue
            impl = None
            try:
                with peak_memory(ctx.device) as pm:
                    impl = c.factory(model, image, target)
                    row["precision"] = impl.precision
                    impl.prepare()
                    if point is not None:
                        try:
                            gate_step(ctx.gate, preset, impl, point)
                        except Exception as exc:  # a path that cannot be checked fails the gate
                            ctx.gate.error(preset, c.key, exc)
                            raise
                    timing = measure(impl.step, device=ctx.device, warmup=o.warmup, repeats=o.repeats)
                row["timing"] = timing.to_dict()
                row["peak_bytes"] = pm.peak_bytes
                row["flops"] = flops[c.form] * c.copies
                row["tflops"] = row["flops"] / (timing.median_ms * 1e-3) / 1e12
                row["describe"] = impl.describe()
                ctx.log(f"  {preset:8s} {c.key:14s} {timing.median_ms:10.3f} ms")
            except Exception as exc:  # one failing implementation must not stop the others
                row["status"] = "error"
                row["reason"] = error_text(exc)
                ctx.log(f"  {preset:8s} {c.key:14s} error: {row['reason']}")
            finally:
                del impl
                free_memory(ctx.device)
        del model
        free_memory(ctx.device)
    return {"rows": rows}
