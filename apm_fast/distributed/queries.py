"""Mode 2: one image's L location queries spread over ranks, pooled exactly across them.

Each rank evaluates a contiguous slice of the L queries with the building blocks of the ``torch``
backend (trigger split: u = W_T T + b1 once per image, P rows of its slice only). The pool's
softmax over L is then combined across ranks exactly:

    m_h   = all-reduce MAX of each rank's max_l score_{h,l}          (a constant: no gradient)
    den_h = all-reduce SUM of sum_l exp(score_{h,l} - m_h)
    num_h = all-reduce SUM of sum_l exp(score_{h,l} - m_h) kv_l
    s_h   = num_h / den_h  (the attention-weighted mean of the cells), then W_v, W_o as usual.

Shifting by any constant m leaves the softmax unchanged, so taking m out of the graph is exact
and its gradient is zero. z comes out bitwise identical on every rank (an all-reduce hands every
rank the same sum), and so does the loss.

Gradients: the SUM all-reduce is differentiated as itself (the gradient of a sum that every rank
receives is the sum of every rank's upstream gradient). Each rank back-propagates loss / world,
so that together the ranks back-propagate the loss once; summing the parameter gradients over
ranks then gives exactly the single-device gradient: every replicated parameter's gradient is the
sum of its contributions through each rank's slice, and the parts after the combination (W_v,
W_o, the query) are counted world x (1 / world) = once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..backends.reference import trigger
from ..backends.torch_rewrite import rgb_split
from ..ttt import TestTimeTrainer, TTTResult
from ..validation import check_images, check_targets
from .env import rank_and_world

__all__ = ["query_slice", "all_reduce_sum", "sharded_single_query_pool", "sharded_forward",
           "ShardedOutput", "sharded_loss_and_grads", "ShardedQueryTrainer", "broadcast_parameters"]


def query_slice(num_queries: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the queries of ``rank``: contiguous, sizes differing by at most one
    (the first ``num_queries % world_size`` ranks take one more). Empty when L < world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    base, extra = divmod(num_queries, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, on every rank; dx = sum over ranks of dy."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return dx, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-reduce SUM over ``group`` (identity without a process group)."""
    if rank_and_world(group)[1] == 1:
        return x
    return _AllReduceSum.apply(x, group)


def _all_reduce_max_(x: torch.Tensor, group=None) -> torch.Tensor:
    if rank_and_world(group)[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def sharded_single_query_pool(attn, query: torch.Tensor, kv: torch.Tensor, group=None) -> torch.Tensor:
    """z = MultiheadAttention(query, kv_all, kv_all) where each rank holds its rows ``kv``
    (B x l_r x D, l_r may be 0) of the L cells; returns B x D, the same on every rank."""
    b, l, dim = kv.shape
    heads = attn.num_heads
    dh = dim // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3, dim=0)
    b_q, _, b_v = attn.in_proj_bias.chunk(3, dim=0)
    q = F.linear(query, w_q, b_q).view(heads, dh)
    k_tilde = torch.einsum("hd,hdD->hD", q, w_k.view(heads, dh, dim))   # key bias cancels
    scores = torch.matmul(kv, k_tilde.t()) / math.sqrt(dh)              # B x l x heads
    with torch.no_grad():
        if l > 0:
            m = scores.amax(dim=1)
        else:
            m = torch.full((b, heads), -math.inf, dtype=scores.dtype, device=scores.device)
        m = _all_reduce_max_(m.contiguous(), group)                       # B x heads
    e = torch.exp(scores - m[:, None, :])
    num = torch.einsum("blh,blD->bhD", e, kv)                            # B x heads x D
    den = e.sum(dim=1)                                                   # B x heads
    # one collective for both sums: [num | den] along the last axis
    packed = all_reduce_sum(torch.cat([num, den[..., None]], dim=-1), group)
    s = packed[..., :dim] / packed[..., dim:]
    o = torch.einsum("hdD,bhD->bhd", w_v.view(heads, dh, dim), s) + b_v.view(heads, dh)
    return attn.out_proj(o.reshape(b, dim))


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


def sharded_forward(model, images: torch.Tensor, group=None, *, want_grid: bool = True,
                    want_rgb: bool | None = None) -> ShardedOutput:
    """The APM forward with the queries spread over ``group``: every rank calls it with the same
    images and parameters and evaluates only its slice of the L queries (see
    :func:`query_slice`). Differentiable; call :func:`sharded_loss_and_grads` for training."""
    images = check_images(images, model.config)
    return _forward(model, images, group, want_grid=want_grid, want_rgb=want_rgb)


def _forward(model, images, group, *, want_grid, want_rgb) -> ShardedOutput:
    c = model.config
    rank, world = rank_and_world(group)
    start, stop = query_slice(c.queries, rank, world)
    t = trigger(model, images)                       # B x G^2: cheap, computed on every rank
    pos = model.pos_in(dtype=t.dtype, device=t.device)[start:stop]
    lin = model.mlp[0]
    d = c.pos_dim
    u = F.linear(t, lin.weight[:, :d], lin.bias)    # trigger split: one vector per image ...
    p = pos @ lin.weight[:, d:].t()                  # ... plus this slice's rows of P
    h = F.relu(u[:, None, :] + p[None])
    for layer in model.mlp[1:]:
        h = F.relu(layer(h))
    f = model.head(h)                                # B x l_r x D
    cls = None
    if c.pool:
        kv = f + model.pos_out(dtype=f.dtype, device=f.device)[start:stop][None]
        cls = sharded_single_query_pool(model.attn, model.query, kv, group)
    rgb = None
    if c.rgb_head and (want_rgb is None or want_rgb):
        rgb = rgb_split(model, f, t, pos)
    return ShardedOutput(cls=cls, grid=f if want_grid else None, rgb=rgb, start=start, stop=stop)


def _flat_all_reduce_grads(params, group, world):
    """Sum the gradients over ranks in one collective (one flat buffer, not one call per
    parameter). No division afterwards: each rank's backward already carried the 1/world."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def sharded_loss_and_grads(model, image: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """One TTT forward + backward with the queries spread over ``group``: sets every parameter's
    ``.grad`` to the single-device gradient of MSE(z, target) (the same on every rank) and
    returns the loss (detached, the same on every rank)."""
    if not model.config.pool:
        raise ValueError("model: TTT regresses the pooled feature, but this config has pool=False")
    image = check_images(image, model.config, "image")
    target = check_targets(target, image.shape[0], model.config.dim, "target")
    return _loss_and_grads(model, image, target, group)


def _loss_and_grads(model, image, target, group):
    _, world = rank_and_world(group)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    z = _forward(model, image, group, want_grid=False, want_rgb=False).cls
    loss = F.mse_loss(z, target)
    # together the ranks back-propagate the loss once (module docstring)
    (loss / world if world > 1 else loss).backward()
    _flat_all_reduce_grads(params, group, world)
    return loss.detach()


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


class ShardedQueryTrainer(TestTimeTrainer):
    """:class:`apm_fast.TestTimeTrainer` with each image's queries spread over ``group``.

    Same API and result as ``TestTimeTrainer.fit`` (cls, losses, seconds), equal to the
    single-device result within the dtype's rounding. Every rank of ``group`` constructs it and
    calls ``fit`` with the same images and targets; the parameters are broadcast from the first
    rank on construction (``sync_init=False`` skips that when the init is known to agree).
    """

    def __init__(self, model, steps: int = 20, lr: float = 1e-4, group=None, *, betas=(0.9, 0.999),
                 eps: float = 1e-8, normalize_target: bool = False, sync_init: bool = True):
        if sync_init:
            broadcast_parameters(model, group)
        super().__init__(model, steps=steps, lr=lr, backend="torch", betas=betas, eps=eps,
                         normalize_target=normalize_target)
        self.group = group
        self.rank, self.world_size = rank_and_world(group)

    def fit(self, images: torch.Tensor, targets: torch.Tensor, *, progress=None) -> TTTResult:
        self._check_same_inputs(images, targets)
        return super().fit(images, targets, progress=progress)

    @torch.no_grad()
    def _check_same_inputs(self, images, targets):
        """Every rank must train on the same data; a cheap fingerprint catches a mix-up that
        would otherwise give silently wrong features."""
        if self.world_size == 1:
            return
        if not (isinstance(images, torch.Tensor) and isinstance(targets, torch.Tensor)):
            return                                   # fit's own checks report the type error
        dev = self.model.device
        x, y = images.detach().to(dev, torch.float64), targets.detach().to(dev, torch.float64)
        fp = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=dev),
                          x.sum(), x.square().sum(), y.sum(), y.square().sum()])
        both = torch.cat([fp, -fp])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:5], -both[5:]):
            raise ValueError(f"images/targets: rank {self.rank} of {self.world_size} was given "
                             f"different data from another rank; every rank must call fit with "
                             f"the same images and targets in mode 2")

    def _fit_one(self, image, target, backend):
        self.reset()
        opt = self._optimizer()
        losses = torch.empty(self.steps, dtype=torch.float32, device=image.device)
        for s in range(self.steps):
            loss = _loss_and_grads(self.model, image, target, self.group)
            opt.step()
            losses[s] = loss
        with torch.no_grad():
            z = _forward(self.model, image, self.group, want_grid=False, want_rgb=False).cls
        return z.detach(), losses
