"""Mode 2: one image's L location queries spread over ranks, pooled exactly across them.

Each rank runs the one driver (``apm_fast.ops.driver``) over a contiguous slice of the queries
(:func:`query_slice`): the position rows of its slice, the column MLP, the pool over its rows. The
pool's softmax over all L is then put together exactly from every rank's (sbar, lse) by
``combine_pool``, the same function that folds chunks of queries together in chunked evaluation
(:class:`QueryShards`, ``combine``): z comes out identical on every rank.

Training (:class:`ShardedQueryTrainer`) is the one trainer's engine with the shards plugged in:
the backward gives each rank its share of every gradient (dL/dz divided by the number of ranks;
the pool's dL/dsbar summed over ranks, the one exchange inside the backward), and the flat
gradient buffer is summed over the ranks once before Adam: every rank then holds the
single-device gradient and takes the same Adam step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..backends import get_backend
from ..ops.driver import columns, combine_pool, rgb_head, weight_names
from ..ops.precision import compute_dtype, exact_convolutions
from ..posenc import position_rows
from ..ttt import TestTimeTrainer, TTTResult
from ..validation import check_images
from .env import rank_and_world

__all__ = ["query_slice", "QueryShards", "sharded_forward", "ShardedOutput", "ShardedQueryTrainer",
           "broadcast_parameters"]


def query_slice(num_queries: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the queries of ``rank``: contiguous, sizes differing by at most one
    (the first ``num_queries % world_size`` ranks take one more). Empty when L < world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    base, extra = divmod(num_queries, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class QueryShards:
    """This rank's slice of the queries and the two exchanges the driver needs (``group``: the
    ranks to spread over; None: all). ``slices`` counts the pools this rank has computed over its
    slice and combined (one per forward)."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = rank_and_world(group)
        self.slices = 0

    def rows(self, num_queries: int) -> tuple[int, int]:
        return query_slice(num_queries, self.rank, self.world)

    def combine(self, sbar: torch.Tensor, lse: torch.Tensor):
        """Every rank's (sbar, lse) of its slice -> the pool over all rows (``combine_pool``)."""
        self.slices += 1
        if self.world == 1:
            return sbar, lse
        parts_s = [torch.empty_like(sbar) for _ in range(self.world)]
        parts_l = [torch.empty_like(lse) for _ in range(self.world)]
        dist.all_gather(parts_s, sbar.contiguous(), group=self.group)
        dist.all_gather(parts_l, lse.contiguous(), group=self.group)
        return combine_pool(torch.stack(parts_s), torch.stack(parts_l))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


@dataclass
class ShardedOutput:
    """cls: B x D pooled feature, identical on every rank (None without pool); grid: B x l_r x D
    features of this rank's queries ``start:stop`` (before the output position code); rgb:
    B x l_r x 3 or None."""

    cls: Optional[torch.Tensor]
    grid: Optional[torch.Tensor]
    rgb: Optional[torch.Tensor]
    start: int
    stop: int


@torch.no_grad()
def sharded_forward(model, images: torch.Tensor, group=None, *, backend: str | None = None,
                    chunk: int = 4096, want_grid: bool = True, want_rgb: bool | None = None) -> ShardedOutput:
    """The APM forward (inference) with the queries spread over ``group``: every rank calls it
    with the same images and parameters and evaluates only its slice, ``chunk`` queries at a time."""
    c = model.config
    images = check_images(images, c).to(model.dtype)
    shards = QueryShards(group)
    start, stop = shards.rows(c.queries)
    prim = get_backend(backend, device=images.device, config=c, workload="forward")
    cdt = compute_dtype(model.dtype, images.device)
    params = dict(model.named_parameters())
    w = {n: params[n].detach().unsqueeze(0) for n in weight_names(c)}
    want_rgb = c.rgb_head and (want_rgb is None or want_rgb)
    cls, grid = columns(prim, w, images, c, cdt=cdt, chunk=chunk, rows=(start, stop),
                        want_grid=want_grid or want_rgb, combine=shards.combine)
    grid = None if grid is None else grid.to(model.dtype)
    rgb = None
    if want_rgb:
        with exact_convolutions(images.device):
            t = F.conv2d(images, model.conv.weight, model.conv.bias, stride=c.patch).flatten(1)
        pos = position_rows(c.pos_dim, c.grid, c.grid, start, stop, dtype=model.dtype, device=images.device)
        rgb = rgb_head(params, c, grid, t, pos)
    return ShardedOutput(cls=None if cls is None else cls.to(model.dtype), grid=grid if want_grid else None,
                         rgb=rgb, start=start, stop=stop)


@torch.no_grad()
def broadcast_parameters(model, group=None, src_rank: int = 0):
    """Copy rank ``src_rank``'s (rank within ``group``) parameters to every rank, so that all
    start from one init."""
    _, world = rank_and_world(group)
    if world == 1:
        return
    src = dist.get_global_rank(group, src_rank) if group is not None else src_rank
    for p in model.parameters():
        dist.broadcast(p.data, src=src, group=group)


_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)     # settings compared by index


class ShardedQueryTrainer:
    """Test-time training with each image's queries spread over ``group``: a
    :class:`apm_fast.TestTimeTrainer` (a table backend, one image at a time) whose engine computes
    this rank's slice (:class:`QueryShards`). Same result as one process within the dtype's
    rounding. Every rank of ``group`` constructs it and calls ``fit`` with the same images and
    targets; the parameters are broadcast from the first rank on construction (``sync_init=False``
    skips that when the init is known to agree). ``shards.slices`` counts the slices run here."""

    def __init__(self, model, steps: int = 20, lr: float = 1e-4, group=None, *, backend: str = "torch",
                 betas=(0.9, 0.999), eps: float = 1e-8, normalize_target: bool = False,
                 precision=None, moments=None, sync_init: bool = True):
        if sync_init:
            broadcast_parameters(model, group)
        self.shards = QueryShards(group)
        self.group, self.rank, self.world_size = group, self.shards.rank, self.shards.world
        self.trainer = TestTimeTrainer(model, steps=steps, lr=lr, backend=backend, betas=betas, eps=eps,
                                       normalize_target=normalize_target, students=1, precision=precision,
                                       moments=moments, shards=self.shards)
        self._check_same_settings()

    def fit(self, images: torch.Tensor, targets: torch.Tensor, *, progress=None) -> TTTResult:
        self._check_same_inputs(images, targets)
        return self.trainer.fit(images, targets, progress=progress)

    @torch.no_grad()
    def _check_same_settings(self):
        """Every rank must train with the same settings: ranks that differ would wait on each
        other's exchanges for ever (steps) or give each rank other features (lr): refused on every
        rank, naming what differs."""
        if self.world_size == 1:
            return
        t = self.trainer
        engine = t.engine
        settings = {"steps": t.steps, "lr": t.lr, "betas[0]": t.betas[0], "betas[1]": t.betas[1], "eps": t.eps,
                    "normalize_target": float(t.normalize_target),
                    "precision": float(_DTYPES.index(engine.compute_dtype)),
                    "moments": float(_DTYPES.index(engine.moment_dtype))}
        v = torch.tensor(list(settings.values()), dtype=torch.float64, device=self.trainer.model.device)
        both = torch.cat([v, -v])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        n = len(settings)
        differ = [k for i, k in enumerate(settings) if both[i] != -both[n + i]]
        if differ:
            mine = dict(settings, precision=str(engine.compute_dtype).replace("torch.", ""),
                        moments=str(engine.moment_dtype).replace("torch.", ""))
            raise ValueError(f"settings: the ranks of the group were given different {', '.join(differ)} "
                             f"(this is rank {self.rank} of {self.world_size}, with "
                             + ", ".join(f"{k} = {mine[k]!r}" for k in differ)
                             + "); every rank must build ShardedQueryTrainer with the same settings")

    @torch.no_grad()
    def _check_same_inputs(self, images, targets):
        """Every rank must train on the same data; a cheap fingerprint catches a mix-up that
        would otherwise give silently wrong features."""
        if self.world_size == 1:
            return
        if not (isinstance(images, torch.Tensor) and isinstance(targets, torch.Tensor)):
            return                                   # fit's own checks report the type error
        dev = self.trainer.model.device
        x, y = images.detach().to(dev, torch.float64), targets.detach().to(dev, torch.float64)
        # NaN/Inf counted, the sums taken over the finite values: data with the same non-finite
        # entries agree here, and fit's own check then names them on every rank
        bad = float((~torch.isfinite(x)).sum() + (~torch.isfinite(y)).sum())
        x, y = x.nan_to_num(0.0, 0.0, 0.0), y.nan_to_num(0.0, 0.0, 0.0)
        fp = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=dev),
                          x.sum(), x.square().sum(), y.sum(), y.square().sum(),
                          torch.tensor(bad, dtype=torch.float64, device=dev)])
        both = torch.cat([fp, -fp])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:6], -both[6:]):
            raise ValueError(f"images/targets: rank {self.rank} of {self.world_size} was given "
                             f"different data from another rank; every rank must call fit with "
                             f"the same images and targets in mode 2")
