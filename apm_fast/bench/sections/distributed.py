"""(h) Both distributed modes against the number of ranks, under torchrun:

    torchrun --standalone --nproc-per-node N -m apm_fast.bench --only distributed

Every group size n in 1, 2, 4, ... N runs on the first n ranks (the others wait), so one JSON
holds the whole curve. A correctness gate first (both modes against one process,
``apm_fast.distributed.selfcheck``, on all ranks): no timing when it fails.

* mode 1 (images across ranks): ``dist_images`` images trained by the single-device trainer,
  spread over n ranks through the restart-safe results file: images/s (strong scaling);
* mode 2 (one image's queries across ranks): the latency of one TTT step of one image whose
  queries are spread over n ranks (the engine's program with shards, eagerly).

Without torchrun (one process) the rows say how to launch it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from ..timing import summarize

__all__ = ["run", "NAME"]

NAME = "distributed"
_HOW = "needs several processes: torchrun --standalone --nproc-per-node N -m apm_fast.bench --only distributed"


def _mode1(ctx, cfg, n, groups, rank, workdir):
    from ...distributed import run_sharded_ttt
    from ...ttt import TestTimeTrainer

    o = ctx.options
    model = ctx.model(o.engine_preset)
    images = ctx.images(o.engine_preset, o.dist_images)
    targets = torch.randn(o.dist_images, cfg.dim, generator=torch.Generator().manual_seed(2)).to(ctx.device)
    names = [f"img-{i:05d}" for i in range(o.dist_images)]
    index = {k: i for i, k in enumerate(names)}
    trainer = TestTimeTrainer(model, steps=o.ttt_steps, lr=o.lr, students=1)
    trainer.fit(images[:1], targets[:1])                               # warm-up
    times = []
    for r in range(3):
        torch.distributed.barrier(group=groups["gloo"])
        t0 = time.perf_counter()
        run_sharded_ttt(names, os.path.join(workdir, f"mode1-n{n}-r{r}.jsonl"), trainer=trainer,
                        group=groups["gloo"], resume=False, load=lambda k: (images[index[k]], targets[index[k]]))
        times.append(time.perf_counter() - t0)
    return o.dist_images / min(times)


def _mode2(ctx, cfg, groups):
    from ...distributed import ShardedQueryTrainer

    o = ctx.options
    model = ctx.model(o.engine_preset)
    image = ctx.images(o.engine_preset, 1)
    target = torch.randn(1, cfg.dim, device=ctx.device)
    trainer = ShardedQueryTrainer(model, steps=o.ttt_steps, lr=o.lr, group=groups["main"],
                                  precision=ctx.amp_dtype or model.dtype)
    prog = trainer.trainer.program(1)
    prog.load(image, target)
    samples = []
    for _ in range(max(20, o.repeats)):
        prog.reset()
        torch.distributed.barrier(group=groups["gloo"])
        t0 = time.perf_counter()
        for _ in range(min(o.ttt_steps, 5)):
            prog.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - t0) / min(o.ttt_steps, 5))
    return summarize(samples, clock="perf_counter per step (synchronized)")


def run(ctx) -> dict:
    import torch.distributed as dist

    from ...distributed.env import init_distributed, launched_world_size
    from ...distributed.selfcheck import check_modes

    if launched_world_size() == 1 and not dist.is_initialized():
        return {"rows": [{"key": "distributed", "status": "absent", "reason": _HOW}]}
    info = init_distributed(device=ctx.device.type)
    world, rank = info.world_size, info.rank
    cfg = ctx.options.config(ctx.options.engine_preset)
    gate = check_modes(ctx.options.config("ttt-l14").replace(grid=8, patch=4, hidden=(96, 64), dim=32, heads=4),
                       steps=3, lr=1e-3, dtype=torch.float32, device=info.device)
    ctx.gate.add("distributed", "distributed", "both modes vs one process", "fp32",
                 max(gate["errors"].values(), default=0.0), gate["tolerance"])
    rows = []
    box = [tempfile.mkdtemp(prefix="apm-dist-bench-") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    sizes = sorted({2 ** k for k in range(world.bit_length()) if 2 ** k <= world} | {world})
    for n in sizes:
        ranks = list(range(n))
        groups = {"main": dist.new_group(ranks), "gloo": dist.new_group(ranks, backend="gloo")}
        row = {"key": f"ranks={n}", "ranks": n, "status": "ok", "reason": ""}
        if not gate["ok"]:
            row.update(status="skipped", reason="the distributed gate failed")
        elif rank < n:
            row["mode1_images_per_s"] = _mode1(ctx, cfg, n, groups, rank, box[0])
            row["mode2_step"] = _mode2(ctx, cfg, groups).to_dict()
            row["timing"] = row["mode2_step"]
        dist.barrier()
        rows.append(row)
    if rank == 0:
        shutil.rmtree(box[0], ignore_errors=True)
    return {"rows": rows, "world_size": world, "gate": gate,
            "columns": [("ranks", "ranks"), ("mode 1 images/s", "mode1_images_per_s"),
                        ("mode 2 ms/step", "timing.median_ms")]}
