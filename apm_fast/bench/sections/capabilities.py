"""(j) The paper's other capabilities: SSL grid distillation's training throughput against the
authors' per-batch column-chunk loop, and the islands of agreement's TTT with the grid kept.

Distillation (``ssl-l14``, B images per step, the teacher excluded: its targets are fixed random
tensors of the right shape, the same for every path): one AdamW step of
``apm_fast.capabilities.distillation`` (the model's forward on a table, the driver's fused autograd
Function, the RGB head, the feature and RGB MSE) against the authors' training step re-implemented
(``model.forward_wrapper`` of rajatmodi62/apm: every column [T ; pos] of the batch materialized,
the plain MLP and RGB head run over chunks of 512 of them, the same losses, Adam); both under the
run's precision (bf16 autocast on a GPU; the authors trained in fp32). images/s = B / the median
step time. The authors' loop is the ``reference`` row.

Islands: one image, ``ttt_steps`` (250 in the full suite, the paper's Figure 3) TTT steps of
``ttt-l14`` with the grid features kept every 50 steps (the captured eval phase replayed after
those steps), in ms per whole run, beside the same run without keeping anything (its cost is the
replays of the eval phase and the grid copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import reference
from ...capabilities.inputs import cell_colours, student_input
from ...model import APM
from ...ttt import TestTimeTrainer
from ..context import free_memory
from ..timing import autocast, measure

__all__ = ["run", "NAME"]

NAME = "capabilities"
AUTHORS_CHUNK = 512          # the authors' fwd_chunk_size of their COCO training


def _batch(ctx, cfg, b):
    g = torch.Generator().manual_seed(ctx.seed_for("ssl-l14") + 11)
    px = torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8).to(ctx.device)
    feats = torch.randn(b, cfg.queries, cfg.dim, generator=g).to(ctx.device)
    return px, feats, cell_colours(px, "ssl", cfg.patch)


def _ours(ctx, model, backend, px, feats, colours):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x = student_input(px, "ssl")

    def step():
        with autocast(ctx.device, ctx.amp_dtype):
            out = model(x, backend=backend)
        loss = F.mse_loss(out.grid.float(), feats) + F.mse_loss(out.rgb.float(), colours)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _authors(ctx, model, px, feats, colours):
    """Their forward_wrapper: the batch's columns materialized, the plain MLP, head and RGB head
    over chunks of 512 columns, concatenated; feature + RGB MSE; Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = student_input(px, "ssl")
    tf, tc = feats.reshape(-1, feats.shape[-1]), colours.reshape(-1, 3)

    def step():
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


def _distill_row(ctx, backend, batch):
    o = ctx.options
    cfg = ctx.config("ssl-l14")
    torch.manual_seed(ctx.seed_for("ssl-l14"))
    model = APM(cfg, device=ctx.device)
    px, feats, colours = _batch(ctx, cfg, batch)
    step = _authors(ctx, model, px, feats, colours) if backend == "reference" else \
        _ours(ctx, model, backend, px, feats, colours)
    t = measure(step, device=ctx.device, warmup=o.warmup, repeats=o.repeats)
    return {"timing": t.to_dict(), "median_ms": t.median_ms, "images_per_s": batch * 1e3 / t.median_ms,
            "batch": batch, "precision": ctx.precision}


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
    for name, status in [("reference", "available")] + ctx.fast_backends():
        base = {"key": f"distill/{name}", "what": "distill step" if name != "reference" else "distill step, authors' loop",
                "backend": name, "batch": batch}
        row = ctx.row(base, status, name, lambda n=name: _distill_row(ctx, n, batch))
        if row["status"] == "ok":
            if name == "reference":
                authors_ms = row["median_ms"]
            elif authors_ms:
                row["speedup_vs_authors"] = authors_ms / row["median_ms"]
        rows.append(row)
        free_memory(ctx.device)
    for name, status in ctx.fast_backends():
        for keep in (True, False):
            base = {"key": f"islands/{name}/{'kept' if keep else 'plain'}",
                    "what": "islands TTT, grid kept" if keep else "same TTT, nothing kept", "backend": name}
            rows.append(ctx.row(base, status, name, lambda n=name, k=keep: _islands_row(ctx, n, k)))
            free_memory(ctx.device)
    cols = [("what", "what"), ("backend", "backend"), ("batch", "batch"), ("steps", "steps"),
            ("ms", "median_ms"), ("img/s", "images_per_s"), ("x authors", "speedup_vs_authors")]
    return {"rows": rows, "columns": cols}
