"""(i) The evaluation's methods side by side: images/s of zero-shot, the ensemble, APM (20 steps,
students side by side), TPT and ZERO (64 views) through the one pipeline, on generated
ImageNet-A-sized photos (500 x 375 JPEGs) against ImageNet-A's 200 classes, for a CLIP ViT-B/16
and a ViT-L/14 teacher with random weights (the same cost as real ones). A method's images/s are
the images over its own time per image (the teacher's share of the batch included, as if it ran
alone: ``apm_fast.classify``); ``all`` is the wall time of the whole loop, every method at once.
"""
from __future__ import annotations

import tempfile
import time

import torch

from ..context import free_memory

__all__ = ["run", "NAME"]

NAME = "evaluation"
TEACHERS = {"ttt-b16": "ViT-B-16", "ttt-l14": "ViT-L-14"}


def _point(ctx, preset, tower):
    import warnings

    from ...baselines import TPT, Views, Zero, ZeroShot
    from ...classify import iter_classify
    from ...datasets import imagenet_classnames, imagenet_subset_indices
    from ...model import APM
    from ...teachers import OpenCLIPTeacher
    from ...ttt import TestTimeTrainer
    from .throughput import _jpegs

    o = ctx.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = ctx.tiny_teacher() if o.quick else OpenCLIPTeacher(tower, None, device=ctx.device)
    names = [imagenet_classnames()[i] for i in imagenet_subset_indices("imagenet-a")]
    if o.quick:
        names = names[:10]
    single = teacher.class_embeddings(names, ["a photo of a {c}."]).float().to(ctx.device)
    methods = [ZeroShot("zeroshot", single), ZeroShot("ensemble", teacher.class_embeddings(names, "ensemble")
                                                        .float().to(ctx.device)),
               Zero("zero", single), TPT("tpt", teacher, names)]
    views = Views.for_teacher(teacher, o.eval_views)
    cfg = o.config(preset).replace(dim=teacher.dim)
    torch.manual_seed(ctx.seed_for(preset))
    trainer = TestTimeTrainer(APM(cfg, device=ctx.device), steps=o.ttt_steps, lr=o.lr,
                              precision=ctx.amp_dtype or torch.float32)
    ms = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = _jpegs(o.eval_images, tmp)
        s = trainer.students_for(len(files))
        list(iter_classify(trainer, files[:s], teacher, names, templates="ensemble", methods=methods,
                           views=views))                                 # build, capture, warm
        t0 = time.perf_counter()
        n = 0
        for r in iter_classify(trainer, files, teacher, names, templates="ensemble", methods=methods, views=views):
            if r.error is not None:
                continue
            n += 1
            ms["apm"] = ms.get("apm", 0.0) + r.teacher_ms + r.ttt_ms
            for name, p in r.predictions.items():
                ms[name] = ms.get(name, 0.0) + p["ms"]
        wall = time.perf_counter() - t0
    out = {"teacher": teacher.name, "images": n, "classes": len(names), "views": o.eval_views,
           "students": s, "precision": trainer.precision, "all_images_per_s": n / wall}
    out.update({f"{k}_images_per_s": 1e3 * n / v for k, v in ms.items()})
    return out


def run(ctx) -> dict:
    rows = []
    for preset, tower in TEACHERS.items():
        base = {"key": f"{preset}/{tower}", "preset": preset, "teacher": tower}
        if preset not in ctx.options.presets and not ctx.options.quick:
            rows.append(dict(base, status="skipped", reason="preset not in this run (--preset)"))
            continue
        rows.append(ctx.row(base, "available", "evaluation", lambda p=preset, t=tower: _point(ctx, p, t)))
        free_memory(ctx.device)
    cols = [("teacher", "teacher"), ("images", "images")]
    cols += [(f"{m} img/s", f"{m}_images_per_s") for m in ("zeroshot", "ensemble", "apm", "tpt", "zero", "all")]
    return {"rows": rows, "columns": cols}
