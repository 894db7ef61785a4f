"""(b) TTT throughput: images per second of whole TTT runs (``ttt_steps`` steps each, teacher
excluded), one image at a time through :class:`apm_fast.TestTimeTrainer` for every backend, and
many students side by side through the GPU engine where it exists.

One-at-a-time rows use the per-image wall times that ``TestTimeTrainer.fit`` records as samples
(``throughput_images`` >= 20 images); the engine's row times whole ``fit`` calls.
"""
from __future__ import annotations

import torch

from ...ttt import TestTimeTrainer
from ..amp import autocast, backend_precision
from ..context import error_text, free_memory
from ..engine_probe import find_side_by_side
from ..timing import measure, peak_memory, summarize

__all__ = ["run", "NAME"]

NAME = "throughput"


def _targets(ctx, model, images):
    return torch.cat([ctx.targets(model, images[i:i + 1], offset=i) for i in range(images.shape[0])])


def _one_at_a_time(ctx, preset, name, model, images, targets):
    o = ctx.options
    # students=1: one image at a time (through the engine's captured step where the backend has
    # a primitive table, the plain autograd loop otherwise)
    trainer = TestTimeTrainer(model, steps=o.ttt_steps, lr=o.lr, backend=name, students=1)
    amp, prec = backend_precision(name, ctx.device, ctx.amp_dtype)
    with autocast(ctx.device, amp):
        trainer.fit(images[:1], targets[:1])                    # warm-up
        with peak_memory(ctx.device) as pm:
            result = trainer.fit(images, targets)
    samples = [s * 1e3 for s in result.seconds]
    n = len(samples)
    timing = summarize(samples, clock="perf_counter (per image, synchronized)", warmup=1)
    return {"timing": timing.to_dict(), "images": n, "precision": prec, "images_per_s": 1e3 / timing.median_ms,
            "images_per_s_mean": n / sum(result.seconds), "peak_bytes": pm.peak_bytes,
            "final_loss_median": float(result.losses[:, -1].median())}


def run(ctx) -> dict:
    o = ctx.options
    rows = []
    for preset in o.ttt_presets():
        model = ctx.model(preset)
        images = ctx.images(preset, o.throughput_images, offset=100)
        targets = _targets(ctx, model, images)
        for name, status in ctx.backends.items():
            row = {"preset": preset, "key": f"ttt-{name}", "label": f"TestTimeTrainer, {name} backend, "
                   "one image at a time", "backend": name, "steps": o.ttt_steps, "status": "ok",
                   "reason": ""}
            rows.append(row)
            if status != "available":
                row.update(status="absent", reason=status)
                continue
            if ctx.skipped(name):
                row.update(status="skipped", reason="excluded by --skip")
                continue
            if ctx.out_of_time():
                row.update(status="skipped", reason=ctx.out_of_time())
                continue
            try:
                row.update(_one_at_a_time(ctx, preset, name, model, images, targets))
                ctx.log(f"  {preset:8s} {name:10s} {row['images_per_s']:10.1f} images/s")
            except Exception as exc:
                row.update(status="error", reason=error_text(exc))
                ctx.log(f"  {preset:8s} {name:10s} error: {row['reason']}")
            free_memory(ctx.device)
        rows.append(_side_by_side(ctx, preset, model, images, targets))
        del model
        free_memory(ctx.device)
    return {"rows": rows}


def _side_by_side(ctx, preset, model, images, targets):
    o = ctx.options
    row = {"preset": preset, "key": "engine", "label": "engine, students side by side",
           "backend": None, "steps": o.ttt_steps, "status": "ok", "reason": ""}
    cls, why = find_side_by_side()
    if cls is None:
        row.update(status="absent", reason=why)
        return row
    if ctx.skipped("engine"):
        row.update(status="skipped", reason="excluded by --skip")
        return row
    if ctx.out_of_time():
        row.update(status="skipped", reason=ctx.out_of_time())
        return row
    try:
        kw = {"steps": o.ttt_steps, "lr": o.lr}
        if o.students is not None:
            kw["students"] = o.students
        with peak_memory(ctx.device) as pm:
            trainer = cls(model, **kw)
            timing = measure(lambda: trainer.fit(images, targets), device=ctx.device,
                             warmup=1, repeats=o.repeats)
        n = images.shape[0]
        row.update(timing=timing.to_dict(), images=n, images_per_s=n * 1e3 / timing.median_ms,
                   peak_bytes=pm.peak_bytes, students=getattr(trainer, "students", o.students))
        ctx.log(f"  {preset:8s} {'engine':10s} {row['images_per_s']:10.1f} images/s")
    except Exception as exc:
        row.update(status="error", reason=error_text(exc))
    free_memory(ctx.device)
    return row
