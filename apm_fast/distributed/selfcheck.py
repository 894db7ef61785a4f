"""Both distributed modes against the single-process engine, on random data: a gate to run
under torchrun on a new machine (``python -m apm_fast.distributed check``) before trusting or
timing anything there."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from ..config import APMConfig
from ..model import APM
from ..ttt import TestTimeTrainer
from .env import rank_and_world
from .queries import ShardedQueryTrainer, broadcast_parameters, sharded_forward
from .ranks import run_sharded_ttt

__all__ = ["TOLERANCE", "make_problem", "check_modes"]

# Largest accepted max|a - b| / max|b| between a distributed and the single-process result.
# The two differ only in the order of the sums over L (split into per-rank partial sums) and in
# where the softmax's max is subtracted: a few units of the dtype's epsilon per reduction,
# amplified a little by the Adam steps (whose update is normalized, so relative errors of the
# gradient stay relative errors of the update). float64 eps = 1.1e-16, float32 eps = 1.2e-7.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def make_problem(config: APMConfig, n_images: int, *, dtype, device, seed: int = 0):
    """A model (same init on every rank: seeded on the CPU, then moved) and random
    images/targets."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = APM(config, dtype=torch.float64).to(device=device, dtype=dtype)
    s = config.image_size
    images = torch.randn(n_images, config.in_chans, s, s, generator=g, dtype=torch.float64)
    targets = torch.randn(n_images, config.dim, generator=g, dtype=torch.float64)
    return model, images.to(device, dtype), targets.to(device, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_modes(config: APMConfig, *, steps: int = 3, lr: float = 1e-3, n_images: int = 5,
                dtype=torch.float64, device="cpu", workdir: str | None = None, group=None) -> dict:
    """Run both modes over ``group`` and compare with one process; every rank calls it. Returns
    (on every rank) a dict of relative errors, the tolerance and ``ok``."""
    rank, world = rank_and_world(group)
    model, images, targets = make_problem(config, n_images, dtype=dtype, device=device)
    broadcast_parameters(model, group)
    errors = {}

    # mode 2: forward, a few TTT steps
    backend = "torch" if dtype == torch.float64 else None
    out = sharded_forward(model, images, group, backend=backend)
    q_res = ShardedQueryTrainer(model, steps=steps, lr=lr, group=group, sync_init=False,
                                backend=backend or "torch", precision=dtype).fit(images[:2], targets[:2])

    # mode 1: the images over the ranks, through the restart-safe results file
    own_dir = None
    if workdir is None:
        box = [tempfile.mkdtemp(prefix="apm-dist-check-") if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                       group=group)
        workdir = own_dir = box[0]
    out_path = os.path.join(workdir, "mode1.jsonl")
    names = [f"img-{i:03d}" for i in range(n_images)][::-1]     # not in sorted order on purpose
    index = {n: i for i, n in enumerate(reversed(names))}
    trainer = TestTimeTrainer(model, steps=steps, lr=lr, backend="torch", students=1, precision=dtype)
    run = run_sharded_ttt(names, out_path, trainer=trainer, resume=False, group=_cpu_group_for(group),
                          load=lambda n: (images[index[n]], targets[index[n]]))

    if rank == 0:
        z = model(images, backend="reference").cls
        errors["mode2_forward_cls"] = _rel(out.cls, z)
        f = model(images, backend="reference").grid[:, out.start:out.stop]
        errors["mode2_forward_grid_slice"] = _rel(out.grid, f) if f.numel() else 0.0
        ref = TestTimeTrainer(model, steps=steps, lr=lr, backend="reference").fit(images, targets)
        errors["mode2_ttt_cls"] = _rel(q_res.cls, ref.cls[:2])
        errors["mode2_ttt_losses"] = _rel(q_res.losses, ref.losses[:2])
        recs = run.records
        errors["mode1_order"] = 0.0 if [r["input"] for r in recs] == names else float("inf")
        got = torch.tensor([r["cls"] for r in recs], dtype=torch.float64)
        want = torch.stack([ref.cls[index[n]] for n in names])
        errors["mode1_ttt_cls"] = _rel(got, want)
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    tol = TOLERANCE.get(dtype, 1e-2)
    verdict = [{"world_size": world, "dtype": str(dtype).replace("torch.", ""), "tolerance": tol,
                "errors": errors, "ok": bool(errors) and all(v <= tol for v in errors.values())}]
    if world > 1:
        dist.broadcast_object_list(verdict, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
    return verdict[0]


def _cpu_group_for(group):
    """Mode 1 coordinates on gloo; ``None`` lets it make its own group over all ranks."""
    return None if group is None else dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
