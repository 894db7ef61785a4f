"""(d) Scaling with the number of location queries (the authors' Figure 2).

APM: one image's trigger, then G_q x G_q location queries streamed in chunks (memory bounded by
the chunk, ``apm_fast.ops.driver.columns``) through the forward's default table for the preset
here, pooled output. On a GPU, from two full chunks on, the full chunks are one
captured CUDA graph replayed at each chunk's offset (the last, partial chunk runs eagerly): the
eager chunk loop is bound by the host (on the H200, ``ttt-b16``, 50,176 queries in chunks of 4096:
23.4 ms through the plain-PyTorch table's eager loop at 76405f6, 4.95 ms replayed with the Triton
table at d3c3cb1; benchmarks/results/h200/). CLIP: open_clip's ViT image tower fed the same number
of patch tokens (an image of G_q * patch pixels a side), timed the way the APM point at the same
G_q was: where the APM replayed its captured chunk, the tower's forward is captured once in a CUDA
graph (the engine's capture, ``timing.measure_graph``) and replayed; where the APM ran eagerly (the
CPU, fewer than two full chunks, a failed capture), the tower runs eagerly too. Each row says how
(``timing_mode``: ``graph`` or ``eager``, and ``timing_mode_reason`` where not a graph on a GPU);
``speedup_vs_clip`` divides only rows timed the same way. Both at batch 1 under the run's
precision. The peak counts the weights too: the APM is built inside its window; the CLIP image
tower is built alone before its window (its stub text tower dropped) and its weights are added to
the peak measured above them, so only the image tower counts, as in ``weights_bytes``. APM's peak
is that of the calls after a first eager one (``first_call_peak_bytes``: that call, with the
Triton kernels' one-time autotuning); a graph's capture is inside each window, so the memory pool
its replays keep is counted (a replay itself allocates nothing). Each APM point's timed output is
checked against the plain-PyTorch table's in float64 on the same queries, in the run's gate.
FLOPs (analytic, forward): a multiply-add is 2 FLOPs (``flops.FLOPS_CONVENTION``).
"""
from __future__ import annotations

import torch

from ...model import APM
from ...backends import default_backend, get_backend
from ...ops import driver
from ...ops.driver import columns, weight_names
from ...ops.precision import compute_dtype, precision_name
from ..clip_models import build_clip, tower_flops, tower_patch
from ..context import error_text, free_memory
from ..flops import apm_flops
from ..gate import TOLERANCES, relative_error
from ..timing import autocast, measure, measure_graph, peak_memory

__all__ = ["run", "NAME"]

NAME = "scaling"


_OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))


def _is_oom(exc) -> bool:
    return isinstance(exc, _OOM) or "out of memory" in str(exc).lower()


def _apm_point(ctx, cfg, g):
    o = ctx.options
    gen = torch.Generator().manual_seed(ctx.seed_for(o.scaling_preset))
    image = torch.randn(1, cfg.in_chans, cfg.image_size, cfg.image_size, generator=gen).to(ctx.device)
    with peak_memory(ctx.device) as pm:
        torch.manual_seed(ctx.seed_for(o.scaling_preset))
        model = APM(cfg, device=ctx.device).eval()
        backend = default_backend(ctx.device, cfg, workload="forward")
        prim = get_backend(backend, device=ctx.device)
        w = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters() if n in weight_names(cfg)}
        with torch.inference_mode(), autocast(ctx.device, ctx.amp_dtype):
            cdt = compute_dtype(model.dtype, ctx.device)
            fn = lambda graphs=None: columns(prim, w, image, cfg, cdt=cdt, chunk=o.scaling_chunk, query_grid=g,
                                             want_grid=False, graphs=graphs)
            fn(False)            # a first, eager call: the kernels' one-time autotuning
            first = pm.restart()
            # the peak from here counts the chunk's capture, whose memory pool the replays keep
            timing = measure(fn, device=ctx.device, warmup=o.warmup, repeats=o.repeats)
            got = fn()[0]        # what was timed (replayed where it was), checked below
            mode = _apm_mode(ctx, g * g, o.scaling_chunk)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    check = _check_point(ctx, cfg, g, w, image, got, cdt, backend)
    return {"timing": timing.to_dict(), **mode, "peak_bytes": pm.peak_bytes, "first_call_peak_bytes": first,
            "weights_bytes": weights,
            "flops": apm_flops(cfg, form="rewritten", queries=g * g)["forward"], "backend": backend, **check}


def _apm_mode(ctx, queries, chunk) -> dict:
    """How the APM point was timed: ``graph`` where ``columns`` replayed its captured chunk (on
    CUDA, from two full chunks on, the capture succeeded), else ``eager`` and why."""
    if ctx.device.type != "cuda":
        return {"timing_mode": "eager", "timing_mode_reason": f"no CUDA graphs on {ctx.device.type}"}
    if queries // chunk < 2:
        return {"timing_mode": "eager",
                "timing_mode_reason": f"{queries} queries: fewer than two full chunks of {chunk}, which "
                                      "columns runs eagerly"}
    kept = list(driver._CHUNK_GRAPH.values())        # the chunk graph that was just replayed
    if not kept or kept[0].graph is None:
        return {"timing_mode": "eager",
                "timing_mode_reason": "CUDA graph capture of the chunk failed (see the warning): chunks ran eagerly"}
    return {"timing_mode": "graph"}


def _check_point(ctx, cfg, g, w, image, got, cdt, backend) -> dict:
    """The timed pooled output against the plain-PyTorch table's in float64 on the same queries
    (eager chunks: exact up to round-off, the pool's slices joined by ``combine_pool``), by the
    gate's norm-wise bound for the compute dtype; recorded in the run's gate (a wrong chunked
    forward fails the run as a wrong forward does)."""
    o = ctx.options
    w64 = {n: t.double() for n, t in w.items()}
    with torch.inference_mode():
        ref = columns(get_backend("torch", device=ctx.device), w64, image.double(), cfg, cdt=torch.float64,
                      chunk=o.scaling_chunk, query_grid=g, want_grid=False, graphs=False)[0]
    precision = precision_name(cdt)
    err, tol = relative_error(got, ref), TOLERANCES.get(precision, TOLERANCES["bf16"])[0]
    ctx.gate.add(o.scaling_preset, f"scaling/{backend}/G={g}", "chunked_forward_vs_float64", precision, err, tol)
    return {"rel_err_vs_float64": err, "tolerance": tol, "precision": precision, "checked": err <= tol}


def _clip_point(ctx, g, patch, graph: bool):
    """The image tower at G_q = ``g``: replayed from a CUDA graph where ``graph`` (the APM point
    at this G_q was), falling back to eager (recorded) where the capture fails; else eager."""
    o = ctx.options
    size = g * patch
    visual = build_clip(o.scaling_clip, device=ctx.device, image_size=size, quick=o.quick,
                        with_text=False)               # the image tower alone, before the window
    weights = sum(p.numel() * p.element_size() for p in visual.parameters())
    with peak_memory(ctx.device) as pm:
        image = torch.randn(1, 3, size, size, device=ctx.device)
        # the autocast weight cache must not outlive a captured region (see timing.autocast)
        with torch.inference_mode(), autocast(ctx.device, ctx.amp_dtype, cache_enabled=not graph):
            if graph:
                timing = measure_graph(lambda: visual(image), device=ctx.device, inner=1, warmup=o.warmup,
                                       repeats=o.repeats, key=f"scaling/clip/{o.scaling_clip}/G={g}")
            else:
                timing = measure(lambda: visual(image), device=ctx.device, warmup=o.warmup,
                                 repeats=o.repeats)
    mode = {"timing_mode": timing.mode}
    if timing.mode == "eager":
        mode["timing_mode_reason"] = (timing.fallback or ("timed as the APM point at this grid was: eager"
                                      if ctx.device.type == "cuda" else f"no CUDA graphs on {ctx.device.type}"))
    fl = tower_flops(visual)
    return {"timing": timing.to_dict(), **mode,
            "peak_bytes": None if pm.peak_bytes is None else weights + pm.peak_bytes,
            "weights_bytes": weights, "flops": fl["forward"], "image_size": size, "tokens": fl["tokens"]}


def run(ctx) -> dict:
    o = ctx.options
    cfg = ctx.config(o.scaling_preset, gate=False)
    rows, notes = [], []
    apm_label = (f"APM {o.scaling_preset} (chunks of {o.scaling_chunk} queries, pooled, "
                 f"{default_backend(ctx.device, cfg, workload='forward')} table)")
    clip_label = f"CLIP {o.scaling_clip} image tower" + (" (quick: shrunk)" if o.quick else "")
    try:
        patch = tower_patch(o.scaling_clip, quick=o.quick)
    except Exception as exc:
        patch, clip_err = None, error_text(exc)
    oom = {"apm": None, "clip": None}
    for g in o.scaling_grids:
        for model_key, label in (("apm", apm_label), ("clip", clip_label)):
            row = {"model": model_key, "label": label, "grid": g, "queries": g * g,
                   "status": "ok", "reason": ""}
            rows.append(row)
            if oom[model_key] is not None:
                row.update(status="skipped", reason=f"ran out of memory at grid {oom[model_key]}")
                continue
            if ctx.out_of_time():
                row.update(status="skipped", reason=ctx.out_of_time())
                continue
            if model_key == "clip" and patch is None:
                row.update(status="error", reason=clip_err)
                continue
            try:
                if model_key == "apm":
                    point = _apm_point(ctx, cfg, g)
                else:     # timed as the APM at this grid was (a graph unless it ran eagerly)
                    apm = rows[-2]
                    point = _clip_point(ctx, g, patch, graph=ctx.device.type == "cuda"
                                        and apm.get("timing_mode") != "eager")
                row.update(point)
                ctx.log(f"  {model_key:5s} L={g * g:<6d} {row['timing']['median_ms']:10.3f} ms")
            except Exception as exc:
                row.update(status="error", reason=error_text(exc))
                if _is_oom(exc):
                    oom[model_key] = g
                ctx.log(f"  {model_key:5s} L={g * g:<6d} error: {row['reason']}")
            free_memory(ctx.device)
    notes.append("APM queries lie on a G_q x G_q grid; the position code keeps the model's width "
                 f"({cfg.pos_dim}), so the weights do not change with L.")
    return {"rows": rows, "notes": notes, "apm_config": cfg.to_dict()}
