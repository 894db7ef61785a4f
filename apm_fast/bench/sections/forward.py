"""(c) Inference: the forward of every preset, per image (B = 1) and batched (B = 64 on the GPU),
returning the grid of features ("grid") or only the pooled feature ("pooled"), every backend.

On a GPU a table's inference forward is a replayed CUDA graph from its second call (what
``model(x)`` under ``torch.no_grad()`` does): that is the row's timing; ``eager`` beside it is the
same forward launched op by op, bound by the host (``ttt-l14`` on the H200, Triton table:
0.053 ms per image eager against 0.046 replayed at B = 64, 1.50 against 0.22 ms at B = 1;
an earlier suite run, benchmarks/results/h200/history/*/suite/forward.json)."""
from __future__ import annotations

import torch

from ..steps import forward_fn
from ..timing import autocast
from ..context import error_text, free_memory
from ..flops import apm_flops
from ..timing import measure, peak_memory

__all__ = ["run", "NAME"]

NAME = "forward"


def run(ctx) -> dict:
    o = ctx.options
    rows = []
    for preset in o.presets:
        cfg = ctx.config(preset)
        model = ctx.model(preset).eval()
        modes = ("grid", "pooled") if cfg.pool else ("grid",)
        for name, status in ctx.backends.items():
            base = {"preset": preset, "backend": name, "key": name}
            if status != "available" or ctx.skipped(name):
                rows.append(dict(base, status="absent" if status != "available" else "skipped",
                                 reason=status if status != "available" else "excluded by --skip"))
                continue
            form = "plain" if name == "reference" else "rewritten"
            fwd = forward_fn(name, ctx.device)
            amp, prec = ctx.amp_dtype, ctx.precision
            for batch in o.forward_batches:
                images = ctx.images(preset, batch, offset=200)
                flops = apm_flops(cfg, form=form, batch=batch)["forward"]
                for mode in modes:
                    row = dict(base, batch=batch, mode=mode, status="ok", reason="", form=form,
                               flops=flops, precision=prec)
                    rows.append(row)
                    if ctx.out_of_time():
                        row.update(status="skipped", reason=ctx.out_of_time())
                        continue

                    def fn(want_grid=(mode == "grid"), graphs=None):
                        return fwd(model, images, want_grid=want_grid, graphs=graphs)

                    try:
                        with torch.inference_mode(), autocast(ctx.device, amp):
                            with peak_memory(ctx.device) as pm:
                                timing = measure(fn, device=ctx.device, warmup=o.warmup,
                                                 repeats=o.repeats)
                        if name != "reference" and ctx.device.type == "cuda":
                            with torch.inference_mode(), autocast(ctx.device, amp):
                                eager = measure(lambda: fn(graphs=False), device=ctx.device,
                                                warmup=o.warmup, repeats=o.repeats)
                            row.update(eager=eager.to_dict(), eager_ms_per_image=eager.median_ms / batch)
                        row.update(timing=timing.to_dict(), peak_bytes=pm.peak_bytes,
                                   ms_per_image=timing.median_ms / batch,
                                   images_per_s=batch * 1e3 / timing.median_ms,
                                   tflops=flops / (timing.median_ms * 1e-3) / 1e12)
                        ctx.log(f"  {preset:8s} {name:10s} B={batch:<3d} {mode:6s} "
                                f"{timing.median_ms:10.3f} ms")
                    except Exception as exc:
                        row.update(status="error", reason=error_text(exc))
                        ctx.log(f"  {preset:8s} {name:10s} B={batch:<3d} {mode:6s} error: {row['reason']}")
                    free_memory(ctx.device)
                del images
        del model
        free_memory(ctx.device)
    return {"rows": rows}
