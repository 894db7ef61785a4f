"""(j) The paper's other capabilities: SSL grid distillation's training throughput against the
authors' per-batch column-chunk loop, and the islands of agreement's TTT with the grid kept.

Distillation (``ssl-l14``, B images per step, the teacher included): one step of
``apm_fast.capabilities.distillation`` as ``apm-fast distill`` runs it (``teacher_targets``: a
ViT-L/14 DINOv2 teacher (timm's ``vit_large_patch14_dinov2``, random weights: the same cost) on
the batch, its patch tokens the targets; ``train_step``: the model's forward on a table, the
driver's fused autograd Function, the RGB head, the feature and RGB MSE, AdamW) against the
authors' training step re-implemented (``model.forward_wrapper`` of rajatmodi62/apm: every
column [T ; pos] of the batch materialized, the plain MLP and RGB head run over chunks of 512 of
them, the same losses, Adam) after the same teacher; both under the run's precision (bf16
autocast on a GPU; the authors trained in fp32). images/s = B / the median step time. The
authors' loop is the ``reference`` row; the ``teacher`` row times the teacher alone.

Islands: one image, ``ttt_steps`` (250 in the full suite, the paper's Figure 3) TTT steps of
``ttt-l14`` with the grid features kept every 50 steps (the captured eval phase replayed after
those steps), in ms per whole run, beside the same run without keeping anything (its cost is the
replays of the eval phase and the grid copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import reference
from ...capabilities.distillation import DistillSettings, teacher_targets, train_step
from ...capabilities.inputs import cell_colours, student_input
from ...model import APM
from ...ttt import TestTimeTrainer
from ..context import free_memory
from ..timing import autocast, measure

__all__ = ["run", "NAME"]

NAME = "capabilities"
AUTHORS_CHUNK = 512          # the authors' fwd_chunk_size of their COCO training
TEACHER = "vit_large_patch14_dinov2"


def _teacher(ctx, cfg):
    """The DINOv2 ViT-L/14 teacher at the student's grid, random weights (shrunk when quick)."""
    import warnings

    from ...teachers.dinov2 import DINOv2Teacher

    kw = {"depth": 1, "embed_dim": cfg.dim, "num_heads": 2} if ctx.options.quick else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # random weights, on purpose: same cost
        torch.manual_seed(ctx.seed_for("ssl-l14") + 7)
        return DINOv2Teacher(TEACHER, None, grid=cfg.grid, device=ctx.device, model_kwargs=kw)


def _batch(ctx, cfg, b):
    g = torch.Generator().manual_seed(ctx.seed_for("ssl-l14") + 11)
    return torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8).to(ctx.device)


def _targets(teacher, px, settings):
    """The teacher's patch tokens of the batch (what a distill step trains on), from the batch's
    pixels at the teacher's size (the same size for ``ssl-l14``; resized in the quick suite)."""
    size = teacher.image_size
    if px.shape[-1] != size:
        px = F.interpolate(px.float(), size=(size, size), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    return teacher_targets(teacher, list(px), [None] * px.shape[0], None, None, settings, px.device)


def _ours(ctx, model, backend, teacher, px, settings):
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas,
                            weight_decay=settings.weight_decay, eps=1e-8)
    amp = ctx.amp_dtype is not None
    return lambda: train_step(model, opt, px, _targets(teacher, px, settings), cfg, settings, backend, amp)


def _authors(ctx, model, teacher, px, settings):
    """Their forward_wrapper: the batch's columns materialized, the plain MLP, head and RGB head
    over chunks of 512 columns, concatenated; feature + RGB MSE; Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    x = student_input(px, settings.input)
    tc = cell_colours(px, settings.input, model.config.patch).reshape(-1, 3)

    def step():
        tf = _targets(teacher, px, settings).reshape(-1, model.config.dim)
        with autocast(ctx.device, ctx.amp_dtype):
            cols = reference.columns(model, x)
            flat = cols.reshape(-1, cols.shape[-1])
            feat_out, rgb_out = [], []
            for a in range(0, flat.shape[0], AUTHORS_CHUNK):
                h = flat[a:a + AUTHORS_CHUNK]
                for lin in model.mlp:
                    h = F.relu(lin(h))
                f = model.head(h)
                feat_out.append(f)
                rgb_out.append(model.rgb(torch.cat([f, flat[a:a + AUTHORS_CHUNK]], 1)))
            loss = F.mse_loss(torch.cat(feat_out).float(), tf) + F.mse_loss(torch.cat(rgb_out).float(), tc)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _distill_row(ctx, backend, batch, teacher):
    o = ctx.options
    cfg = ctx.config("ssl-l14")
    settings = DistillSettings(batch=batch)
    px = _batch(ctx, cfg, batch)
    if backend == "teacher":
        fn = lambda: _targets(teacher, px, settings)
    else:
        torch.manual_seed(ctx.seed_for("ssl-l14"))
        model = APM(cfg, device=ctx.device)
        fn = _authors(ctx, model, teacher, px, settings) if backend == "reference" else \
            _ours(ctx, model, backend, teacher, px, settings)
    t = measure(fn, device=ctx.device, warmup=o.warmup, repeats=o.repeats)
    return {"timing": t.to_dict(), "median_ms": t.median_ms, "images_per_s": batch * 1e3 / t.median_ms,
            "batch": batch, "precision": ctx.precision, "teacher": f"{TEACHER} (random weights)"}


def _islands_row(ctx, backend, keep):
    o = ctx.options
    steps, every = (o.ttt_steps, max(1, o.ttt_steps // 5)) if o.quick else (250, 50)
    cfg = ctx.config("ttt-l14", gate=False)
    torch.manual_seed(ctx.seed_for("ttt-l14"))
    trainer = TestTimeTrainer(APM(cfg, device=ctx.device), steps=steps, lr=o.lr, backend=backend,
                              precision=ctx.amp_dtype or torch.float32)
    x = ctx.images("ttt-l14", 1, offset=300)
    y = torch.randn(1, cfg.dim, generator=torch.Generator().manual_seed(5)).to(ctx.device)
    at = list(range(every, steps + 1, every))
    fn = (lambda: trainer.trajectory(x, y, at)) if keep else (lambda: trainer.fit(x, y))
    t = measure(fn, device=ctx.device, warmup=max(1, o.warmup), repeats=o.repeats)
    return {"timing": t.to_dict(), "median_ms": t.median_ms, "steps": steps, "captured": len(at) if keep else 0,
            "ms_per_step": t.median_ms / steps, "precision": trainer.precision}


def run(ctx) -> dict:
    o = ctx.options
    rows = []
    batch = 2 if o.quick else 16
    authors_ms = None
    try:
        teacher, why = _teacher(ctx, ctx.config("ssl-l14")), None
    except Exception as exc:                  # no timm: the rows say so
        teacher, why = None, f"the DINOv2 teacher could not be built: {exc}"
    what = {"teacher": "DINOv2 teacher alone", "reference": "distill step, authors' loop (teacher included)"}
    for name, status in [("teacher", "available"), ("reference", "available")] + ctx.fast_backends():
        base = {"key": f"distill/{name}", "what": what.get(name, "distill step (teacher included)"),
                "backend": name, "batch": batch}
        row = ctx.row(base, status if why is None else why, name, lambda n=name: _distill_row(ctx, n, batch, teacher))
        if row["status"] == "ok":
            if name == "reference":
                authors_ms = row["median_ms"]
            elif authors_ms and name != "teacher":
                row["speedup_vs_authors"] = authors_ms / row["median_ms"]
        rows.append(row)
        free_memory(ctx.device)
    teacher = None
    for name, status in ctx.fast_backends():
        for keep in (True, False):
            base = {"key": f"islands/{name}/{'kept' if keep else 'plain'}",
                    "what": "islands TTT, grid kept" if keep else "same TTT, nothing kept", "backend": name}
            rows.append(ctx.row(base, status, name, lambda n=name, k=keep: _islands_row(ctx, n, k)))
            free_memory(ctx.device)
    cols = [("what", "what"), ("backend", "backend"), ("batch", "batch"), ("steps", "steps"),
            ("ms", "median_ms"), ("img/s", "images_per_s"), ("x authors", "speedup_vs_authors")]
    return {"rows": rows, "columns": cols}
