"""(b) TTT throughput: images per second of whole TTT runs (``ttt_steps`` steps each).

* one image at a time through :class:`apm_fast.TestTimeTrainer` for every backend (``reference``:
  the autograd loop; a table: the engine at S = 1), from the per-image times it records;
* students side by side on the engine, for every table and every S of ``students_list``
  (teacher excluded), from whole ``fit`` calls; at the largest S also with bf16 Adam moments, with
  their effect on ``cls`` against the fp32-moment run on the same images, with the table's other
  Adam schedule, and with the position products computed the other way (``position-halves`` /
  ``position-gemm``: from the code's separable form, or one GEMM over the L rows), and with the
  first layer's activation handled the other way (``first-act-kept`` / ``first-act-rebuilt``:
  written out once in the forward and kept for the backward, or built again where it is read),
  and with the pool's weights updated the other way (``pool-factors`` / ``pool-written``: from
  their gradients' factors, or from the gradients written out); each row also times the batch's
  reset to the snapshot alone (``reset_ms``; ``reset_share``: its share of a batch);
* end to end (on the default table for the preset here): :func:`apm_fast.iter_classify` over generated photo-sized JPEGs with a CLIP
  teacher of random weights (same cost as real ones), loader, teacher and students overlapped,
  beside the teacher alone at the same batch: ``images_per_s`` over the whole call (the loader's
  workers starting included), ``images_per_s_after_first_batch`` once the first batch's results
  are out (the rate of a long run).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ...backends import default_backend, get_backend
from ...ttt import TestTimeTrainer
from ..context import free_memory
from ..timing import measure, peak_memory, summarize
from .engine import with_switches

__all__ = ["run", "NAME"]

NAME = "throughput"


def _targets(ctx, model, images):
    return torch.cat([ctx.targets(model, images[i:i + 1], offset=i) for i in range(images.shape[0])])


def _trainer(ctx, model, backend, students, moments=None, **switches):
    """A trainer of the run's protocol with the engine's ``switches`` set (None: the table's default)."""
    o = ctx.options
    prec = None if backend == "reference" else (ctx.amp_dtype or model.dtype)
    trainer = TestTimeTrainer(model, steps=o.ttt_steps, lr=o.lr, backend=backend, students=students, precision=prec,
                              moments=moments)
    return with_switches(trainer, **switches)


def _one_at_a_time(ctx, name, model, images, targets):
    trainer = _trainer(ctx, model, name, 1)
    trainer.fit(images[:1], targets[:1])                    # warm-up (capture, autotuning)
    with peak_memory(ctx.device) as pm:
        result = trainer.fit(images, targets)
    samples = [s * 1e3 for s in result.seconds]
    timing = summarize(samples, clock="perf_counter (per image, synchronized)", warmup=1)
    return {"timing": timing.to_dict(), "images": len(samples), "precision": trainer.precision,
            "images_per_s": 1e3 / timing.median_ms, "images_per_s_mean": len(samples) / sum(result.seconds),
            "peak_bytes": pm.peak_bytes, "final_loss_median": float(result.losses[:, -1].median())}


def _side_by_side(ctx, preset, name, model, s, moments=None, **switches):
    """Images/s of 2 S images, S side by side; with bf16 moments also how far their cls moves from
    the fp32-moment run's on the same images (relative, and the share whose closest target changes).
    ``switches``: the engine's switches set the way the table does not by default, to compare in
    one run: ``overlap`` (each layer's Adam beside the rest of the backward, or the whole Adam
    after it), ``position_halves`` (the ``position-halves`` / ``position-gemm`` rows),
    ``first_layer_act_kept`` (``first-act-kept`` / ``first-act-rebuilt``), ``pool_factors``
    (``pool-factors`` / ``pool-written``)."""
    o = ctx.options
    images = ctx.images(preset, 2 * s, offset=300)
    targets = torch.randn(2 * s, model.config.dim, generator=torch.Generator().manual_seed(s)).to(ctx.device)
    effect = {}
    if moments == "bf16":
        full = _trainer(ctx, model, name, s).fit(images, targets).cls.float()
        half = _trainer(ctx, model, name, s, moments).fit(images, targets).cls.float()
        unit = torch.nn.functional.normalize(targets.float(), dim=-1)

        def closest(c):
            return (torch.nn.functional.normalize(c, dim=-1) @ unit.t()).argmax(1)
        effect = {"cls_rel_vs_fp32_moments": float((half - full).norm() / full.norm()),
                  "closest_changed": float((closest(half) != closest(full)).float().mean())}
        free_memory(ctx.device)
    with peak_memory(ctx.device) as pm:
        trainer = _trainer(ctx, model, name, s, moments, **switches)
        trainer.fit(images[:s], targets[:s])                # build, capture, warm
        timing = measure(lambda: trainer.fit(images, targets), device=ctx.device, warmup=0,
                         repeats=max(20, o.repeats))
    # the batch's reset to the snapshot alone (part of every batch above)
    reset = measure(trainer.engine.program(s).reset, device=ctx.device, warmup=1, repeats=o.repeats)
    return {**effect, "timing": timing.to_dict(), "images": 2 * s, "students": s, "precision": trainer.precision,
            "reset_ms": reset.median_ms, "reset_share": reset.median_ms / (timing.median_ms / 2),
            "moments": trainer.moments, "adam_beside_backward": trainer.engine.program(s).overlap,
            "position_halves": trainer.engine.program(s).pos_grid is not None,
            "first_layer_act_kept": trainer.engine.program(s).first_layer_act_kept,
            "pool_from_factors": "attn.in_proj_weight" in trainer.engine.program(s).factored,
            "images_per_s": 2 * s * 1e3 / timing.median_ms, "peak_bytes": pm.peak_bytes,
            "peak_bytes_per_student": None if pm.peak_bytes is None else pm.peak_bytes / s,
            "mode": trainer.engine.mode}


def _jpegs(n, folder):
    """``n`` photo-sized JPEGs (500 x 375, smooth gradients plus noise) written to ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b + 2 * i), np.sin((xx + yy) * c)], -1)
        img = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)) * 255).clip(0, 255).astype(np.uint8)
        paths.append(str(Path(folder) / f"img_{i:04d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def _end_to_end(ctx, preset, tower, name):
    """Images/s of the whole pipeline (loader, teacher, students, logits) on generated JPEGs."""
    import warnings

    from ...classify import iter_classify
    from ...model import APM
    from ...teachers import OpenCLIPTeacher
    from ...teachers.prompts import imagenet_classnames

    o = ctx.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = (ctx.tiny_teacher() if o.quick else OpenCLIPTeacher(tower, None, device=ctx.device))
    cfg = ctx.options.config(preset).replace(dim=teacher.dim)
    torch.manual_seed(ctx.seed_for(preset))
    trainer = _trainer(ctx, APM(cfg, device=ctx.device), name, o.students)
    classes = list(imagenet_classnames()) if not o.quick else [f"class {i}" for i in range(10)]
    with tempfile.TemporaryDirectory() as tmp:
        files = _jpegs(o.e2e_images, tmp)
        s = trainer.students_for(len(files))
        for _ in iter_classify(trainer, files[:s], teacher, classes):     # build, capture, warm
            pass
        t0 = time.perf_counter()
        n, first = 0, None
        for r in iter_classify(trainer, files, teacher, classes):
            n += r.error is None
            first = first or time.perf_counter()           # the first batch's results are out
        seconds = time.perf_counter() - t0
        steady = (n - s) / (time.perf_counter() - first) if n > s else None
        from ...images import to_pil
        xb = torch.stack([teacher.preprocess(to_pil(f)) for f in files[:s]]).to(ctx.device)
    teacher.embed_images(xb)
    t = measure(lambda: teacher.embed_images(xb), device=ctx.device, warmup=1, repeats=20)
    return {"images": n, "students": s, "seconds": seconds, "images_per_s": n / seconds,
            "images_per_s_after_first_batch": steady,
            "teacher": teacher.name, "teacher_only_images_per_s": s * 1e3 / t.median_ms,
            "classes": len(classes), "precision": trainer.precision, "mode": trainer.engine.mode}


def run(ctx) -> dict:
    o = ctx.options
    rows = []
    for preset in o.ttt_presets():
        model = ctx.model(preset)
        images = ctx.images(preset, o.throughput_images, offset=100)
        targets = _targets(ctx, model, images)
        tables = [n for n, st in ctx.backends.items() if n != "reference"]
        for name, status in ctx.backends.items():
            rows.append(ctx.row(dict(preset=preset, key=f"alone/{name}", backend=name, students=1,
                                     steps=o.ttt_steps, label=f"one image at a time, {name}"),
                                status, name, lambda n=name: _one_at_a_time(ctx, n, model, images, targets)))
        for name in tables:
            for s in o.students_list:
                rows.append(ctx.row(dict(preset=preset, key=f"side-by-side/{name}/S={s}", backend=name,
                                         students=s, steps=o.ttt_steps, label=f"{s} students side by side, {name}"),
                                    ctx.backends[name], name, lambda n=name, s=s: _side_by_side(ctx, preset, n, model, s)))
        usable = [n for n in tables if ctx.backends[n] == "available" and not ctx.skipped(n)]
        for name in usable:                        # bf16 moments, at the most students
            if getattr(get_backend(name, device=ctx.device), "bf16_moments", True) and o.students_list:
                s = max(o.students_list)
                rows.append(ctx.row(dict(preset=preset, key=f"side-by-side/{name}/S={s}/bf16-moments", backend=name,
                                         students=s, steps=o.ttt_steps,
                                         label=f"{s} students side by side, {name}, bf16 moments"),
                                    "available", name,
                                    lambda n=name, s=s: _side_by_side(ctx, preset, n, model, s, "bf16")))
                if ctx.device.type == "cuda":     # the table's other ways, each beside its default in the same run
                    ov, ov_suffix, ov_words = ctx.other_adam(name, s)
                    halves, h_suffix, h_words = ctx.other_position(name, s)
                    kept, k_suffix, k_words = ctx.other_first_act(name)
                    pool, p_suffix, p_words = ctx.other_pool(name, s)
                    for suffix, words, kw in ((ov_suffix, ov_words, {"overlap": ov}),
                                              (h_suffix, h_words, {"position_halves": halves}),
                                              (k_suffix, k_words, {"first_layer_act_kept": kept}),
                                              (p_suffix, p_words, {"pool_factors": pool})):
                        rows.append(ctx.row(dict(preset=preset, key=f"side-by-side/{name}/S={s}/{suffix}",
                                                 backend=name, students=s, steps=o.ttt_steps,
                                                 label=f"{s} students side by side, {name}, {words}"),
                                            "available", name,
                                            lambda n=name, s=s, kw=kw: _side_by_side(ctx, preset, n, model, s, **kw)))
        fast = default_backend(ctx.device, ctx.config(preset))
        best = fast if fast in usable else next(iter(usable), None)
        tower = dict(o.table4_pairs).get(preset)
        if best and tower and o.e2e_images:
            rows.append(ctx.row(dict(preset=preset, key=f"end-to-end/{best}", backend=best, steps=o.ttt_steps,
                                     label=f"end to end with {tower} (random weights), {best}"),
                                "available", best, lambda: _end_to_end(ctx, preset, tower, best)))
        del model
        free_memory(ctx.device)
    return {"rows": rows}
