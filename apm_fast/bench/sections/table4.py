"""(e) The paper's Table 4 re-measured: parameters, peak memory and FLOPs of a TTT run of
t = 1 ... t_max steps, the student (APM) and its teacher (a CLIP image tower, run once per image)
counted apart, against one TPT step (views through the image tower, the text tower's forward and
backward over the class prompts).

FLOPs come two ways: analytic (spec section 3; :mod:`apm_fast.bench.flops`) and measured with
``torch.utils.flop_counter.FlopCounterMode`` on the real modules. A TTT run of t steps costs
t x (forward + backward) + one final forward (the prediction); the teacher's forward is counted
once; a TPT run of t steps costs t x step + one final forward of one view and all prompts.
A multiply-add is 2 FLOPs (``flops.FLOPS_CONVENTION``). A teacher's peak memory counts its image
tower alone (weights included), as its ``params`` do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends import default_backend
from ..timing import autocast
from ..clip_models import TPTStep, build_clip, text_tower_flops, tower_flops, tower_params
from ..context import error_text, free_memory
from ..flops import apm_flops, count_flops
from ..steps import EagerStep, forward_fn
from ..timing import measure, peak_memory

__all__ = ["run", "NAME"]

NAME = "table4"


def _by_t(per_step, once, t_max):
    return [int(t * per_step + once) for t in range(1, t_max + 1)]


def _measured_apm(model, image, target, backend, amp_dtype):
    fwd = forward_fn(backend, model.device)

    def forward():
        # with autograd on: the counter's module tracker trips over nn.MultiheadAttention's
        # inputs under no_grad, and the forward's FLOPs are the same either way
        with autocast(model.device, amp_dtype):
            fwd(model, image, want_grid=False)

    def step():
        with autocast(model.device, amp_dtype):
            z = fwd(model, image, want_grid=False)[0]
        F.mse_loss(z.float(), target).backward()

    f = count_flops(forward)
    s = count_flops(step)
    model.zero_grad(set_to_none=True)
    return f, s


def _student(ctx, preset):
    o = ctx.options
    cfg = ctx.config(preset)
    row = {"role": "student", "name": f"APM {preset}" + (" (quick: shrunk)" if o.quick else ""),
           "preset": preset, "status": "ok", "reason": ""}
    model = ctx.model(preset)
    image = ctx.images(preset, 1)
    target = ctx.targets(model, image)
    row["params"] = sum(p.numel() for p in model.parameters())
    flops = {}
    for form, backend in (("plain", "reference"), ("rewritten", "torch")):
        a = apm_flops(cfg, form=form)
        f, s = _measured_apm(model, image, target, backend, ctx.amp_dtype)
        flops[form] = {"analytic": {"forward": a["forward"], "step": a["step"],
                                    "by_t": _by_t(a["step"], a["forward"], o.t_max)},
                       "measured": {"forward": f, "step": s, "by_t": _by_t(s, f, o.t_max)}}
    row["flops"] = flops
    # peak memory of a whole TTT run (t_max steps), for the plain eager step and the package's
    # default backend on this device
    fast = default_backend(ctx.device, cfg)
    peaks = {}
    for label, backend in (("plain eager", "reference"), (f"{fast} backend", fast)):
        impl = None
        with peak_memory(ctx.device) as pm:
            impl = EagerStep(model, image, target, backend=backend, lr=o.lr, amp_dtype=ctx.amp_dtype)
            for _ in range(o.t_max):
                impl.step()
        peaks[label] = pm.peak_bytes
        del impl
        free_memory(ctx.device)
    row["peak_bytes"] = peaks
    del model
    return row


def _teacher(ctx, tower):
    """The image tower alone: built before the peak's window (its stub text tower dropped) and its
    weights added to the peak measured above them, so that the peak, like ``params``, counts the
    image tower only. Timed eagerly (``timing_mode``; nothing here is compared by speed)."""
    o = ctx.options
    row = {"role": "teacher", "name": f"CLIP {tower} image tower" + (" (quick: shrunk)" if o.quick else ""),
           "tower": tower, "status": "ok", "reason": ""}
    visual = build_clip(tower, device=ctx.device, quick=o.quick, with_text=False)
    weights = sum(p.numel() * p.element_size() for p in visual.parameters())
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    with peak_memory(ctx.device) as pm:
        image = torch.randn(1, 3, size, size, device=ctx.device)
        with torch.no_grad(), autocast(ctx.device, ctx.amp_dtype):
            timing = measure(lambda: visual(image), device=ctx.device, warmup=o.warmup,
                             repeats=o.repeats)
    row["peak_bytes"] = None if pm.peak_bytes is None else weights + pm.peak_bytes
    row["weights_bytes"] = weights
    row["params"] = tower_params(visual)
    row["timing"] = timing.to_dict()
    row["timing_mode"] = timing.mode
    a = tower_flops(visual)["forward"]
    with torch.no_grad(), autocast(ctx.device, ctx.amp_dtype):
        m = count_flops(lambda: visual(image))
    row["flops"] = {"analytic": {"forward": a, "by_t": _by_t(0, a, o.t_max)},
                    "measured": {"forward": m, "by_t": _by_t(0, m, o.t_max)}}
    del visual
    free_memory(ctx.device)
    return row


def _tpt(ctx, tower):
    o = ctx.options
    row = {"role": "tpt", "name": f"TPT step, CLIP {tower} ({o.tpt_views} views, {o.tpt_prompts} prompts)"
           + (" (quick: shrunk)" if o.quick else ""), "tower": tower, "status": "ok", "reason": ""}
    with peak_memory(ctx.device) as pm:
        model = build_clip(tower, device=ctx.device, quick=o.quick, with_text=True)
        tpt = TPTStep(model, views=o.tpt_views, prompts=o.tpt_prompts, device=ctx.device,
                      amp_dtype=ctx.amp_dtype, seed=o.seed)
        timing = measure(tpt.step, device=ctx.device, warmup=o.warmup, repeats=o.repeats)
    row["peak_bytes"] = pm.peak_bytes
    row["timing"] = timing.to_dict()
    row["timing_mode"] = timing.mode
    row["params"] = tower_params(model)
    row["trainable_params"] = tpt.ctx.numel()
    img = tower_flops(model.visual)["forward"]
    txt = text_tower_flops(model, o.tpt_prompts)
    step_a = o.tpt_views * img + txt["forward"] + txt["backward"]
    final_a = img + txt["forward"]
    step_m = count_flops(lambda: tpt.loss().backward())
    tpt.opt.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast(ctx.device, ctx.amp_dtype):
        view = tpt.images[:1]
        final_m = count_flops(lambda: (model.encode_image(view), tpt.encode_text()))
    row["flops"] = {"analytic": {"step": step_a, "final": final_a,
                                 "by_t": _by_t(step_a, final_a, o.t_max)},
                    "measured": {"step": step_m, "final": final_m,
                                 "by_t": _by_t(step_m, final_m, o.t_max)}}
    del tpt, model
    free_memory(ctx.device)
    return row


def run(ctx) -> dict:
    o = ctx.options
    rows, notes = [], []
    pairs = [(p, t) for p, t in o.table4_pairs if p in o.presets]
    jobs = []
    for preset, tower in pairs:
        jobs.append(("student", preset, lambda p=preset: _student(ctx, p)))
        jobs.append(("teacher", tower, lambda t=tower: _teacher(ctx, t)))
    for tower in o.tpt_towers:
        jobs.append(("tpt", tower, lambda t=tower: _tpt(ctx, t)))
    for role, what, job in jobs:
        if ctx.out_of_time():
            rows.append({"role": role, "name": what, "status": "skipped", "reason": ctx.out_of_time()})
            continue
        try:
            row = job()
            ctx.log(f"  {role:8s} {what:10s} params {row['params'] / 1e6:8.2f} M")
        except Exception as exc:
            row = {"role": role, "name": what, "status": "error", "reason": error_text(exc)}
            ctx.log(f"  {role:8s} {what:10s} error: {row['reason']}")
        free_memory(ctx.device)
        rows.append(row)
    if ctx.device.type != "cuda":
        notes.append("peak memory needs torch.cuda.max_memory_allocated: not measured on the CPU")
        notes.append("on the CPU the flop counter does not see the attention kernel of "
                     "scaled_dot_product_attention: measured FLOPs of CLIP, TPT and the plain "
                     "APM pool lack the q k^T / a v terms")
    return {"rows": rows, "notes": notes, "pairs": [list(p) for p in pairs], "t_max": o.t_max}
