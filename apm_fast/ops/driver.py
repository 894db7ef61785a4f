"""The whole APM forward and backward over any table of primitives (spec section 3).

``forward`` / ``backward`` work on S students at once; the weights come as a dict
``{model parameter name: (S, *shape) tensor}`` (the names of ``APM.named_parameters()``), so an
engine can keep them as views of one flat buffer. The backward is written out by hand (no
autograd): it is the sequence of launches a CUDA graph captures. The small per-image pieces
(trigger conv, u = W_T T + b1, the pool's q/k~/value/output projections) stay in PyTorch: they
are a few hundred KFLOP; with ``beside=True`` (the engine) the ones that need no GEMM just
launched run on a second CUDA stream beside the GEMMs (:class:`Beside`).

Any slice of the location queries can be computed: the rows are those of the position codes
passed in (``pos_in``, ``pos_out``: the model's whole grid, a slice of it, or another grid). The
pool's softmax over all rows is then put together exactly by :func:`combine_pool` from the
slices' (sbar, lse): by :func:`columns` over chunks of one image's queries (inference with
bounded memory), and across ranks through ``combine=`` (``apm_fast.distributed``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..posenc import position_cells, position_factors, position_halves
from .contract import acc_dtype_for, bmm_acc, head_blocks
from .kept import KeptGraph, cache, kept, side_stream

__all__ = ["Beside", "FusedCtx", "forward", "backward", "weight_names", "unfold_patches", "trigger_split",
           "trigger_u", "column_mlp", "position_product", "position_weight_grad", "pool_query", "pool_output",
           "output_start", "combine_pool", "columns", "rgb_head", "TRIGGER_COLUMNS", "FACTORED", "keeps_first_act"]

# the first layer's weight (trigger columns, then position columns)
FIRST_WEIGHT = "mlp.0.weight"
# the weights whose gradients ``backward`` can give by their factors instead of writing them
FACTORED = (FIRST_WEIGHT, "attn.in_proj_weight", "attn.out_proj.weight")


def weight_names(config) -> List[str]:
    """Parameter names the driver reads (and trains), in the model's order; no RGB head."""
    names = ["conv.weight", "conv.bias"]
    for i in range(len(config.hidden)):
        names += [f"mlp.{i}.weight", f"mlp.{i}.bias"]
    names += ["head.weight", "head.bias"]
    if config.pool:
        names += ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                  "attn.out_proj.bias", "query"]
    return names


def unfold_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(S, B, C, G*p, G*p) -> (S, B, L, C*p*p), patches in the conv weight's (c, ky, kx) order."""
    s, b, c, hh, ww = images.shape
    g_h, g_w = hh // patch, ww // patch
    x = images.reshape(s, b, c, g_h, patch, g_w, patch)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(s, b, g_h * g_w, c * patch * patch)


def fold_patches(patches: torch.Tensor, channels: int, patch: int, grid: tuple) -> torch.Tensor:
    """The inverse of :func:`unfold_patches`: (S, B, L, C*p*p) -> (S, B, C, G_h*p, G_w*p), for
    ``grid`` (G_h, G_w) (the patches do not overlap: a permutation of the elements)."""
    s, b = patches.shape[:2]
    g_h, g_w = grid
    x = patches.reshape(s, b, g_h, g_w, channels, patch, patch)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(s, b, channels, g_h * patch, g_w * patch)


class Beside:
    """Small work that does not need the main stream's latest kernels, run on a second stream
    (``side_stream(device, "beside")``, as high a priority as the main one) so that it overlaps
    them instead of waiting its turn: at one image the forward's trigger and u run beside the
    position GEMM, the pool's query projections beside the column MLP, the pool parameters'
    gradients beside the MLP's backward and the conv's gradients beside the first layer's.
    Captured into a graph, each block is a fork and a join. Off (asked so, or not CUDA), the
    blocks run inline, in the same order, with the same results.

    ``with beside(*reads):`` runs the block on the side stream after everything enqueued so far on
    the current stream (the main one, where the driver opens its blocks); ``reads``: tensors of
    that stream the block reads (the allocator keeps them from reuse until the block has run).
    ``mark()`` (inside a block): a point of the side stream to join later. ``join(*made,
    upto=None)``: the main stream waits for the side stream (up to the mark ``upto``); ``made``:
    side-stream tensors the main stream reads from then on. ``role``: which of
    :func:`side_stream`'s streams is the side one (the engine's early Adam uses ``"adam"``)."""

    def __init__(self, device, on: bool, role: str = "beside"):
        self.on = bool(on) and torch.device(device).type == "cuda"
        if self.on:
            self.main = torch.cuda.current_stream(device)
            self.side = side_stream(device, role)

    @contextlib.contextmanager
    def __call__(self, *reads):
        if not self.on:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream(self.side.device))
        for t in reads:
            if t is not None:
                t.record_stream(self.side)
        with torch.cuda.stream(self.side):
            yield

    def mark(self):
        if not self.on:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    @contextlib.contextmanager
    def resume(self):
        """Back on the side stream, after its own work only (not the main stream's since): to
        enqueue what follows that work there, e.g. an announcement of what it made."""
        if not self.on:
            yield
            return
        with torch.cuda.stream(self.side):
            yield

    def join(self, *made, upto=None):
        if not self.on:
            return
        if upto is None:
            self.main.wait_stream(self.side)
        else:
            self.main.wait_event(upto)
        for t in made:
            if t is not None:
                t.record_stream(self.main)


@dataclass
class FusedCtx:
    """What the backward needs; everything else is recomputed."""

    patches: torch.Tensor          # (S, B, G^2, C p p)  acc
    t: torch.Tensor                # (S, B, d)         acc: the trigger
    u: torch.Tensor                # (S, B, H1)        acc
    p: Optional[torch.Tensor]      # (S, L, H1)        compute; None where the kept activation was
                                   # made from the position code's halves (P never written)
    acts: List[Optional[torch.Tensor]]   # inputs of the layers from the first consumer on: (S, M, K)
                                         # compute; the first, ReLU(P + u), None where not kept
    f: torch.Tensor                # (S, B, L, D)      compute
    q: Optional[torch.Tensor]      # (S, D)  acc
    kt: Optional[torch.Tensor]     # (S, H, D)  acc
    sbar: Optional[torch.Tensor]   # (S, B, H, D)  acc, over all rows (combined)
    lse: Optional[torch.Tensor]    # (S, B, H)  acc, over all rows (combined)
    o: Optional[torch.Tensor]      # (S, B, D)  acc
    cdt: torch.dtype


def _layers(w, config):
    """[(weight, bias, relu)] of every layer after the first, the head last."""
    out = [(w[f"mlp.{i}.weight"], w[f"mlp.{i}.bias"], True) for i in range(1, len(config.hidden))]
    out.append((w["head.weight"], w["head.bias"], False))
    return out


def forward(prim, w: Dict[str, torch.Tensor], images: torch.Tensor, config, pos_in, pos_out, *,
            cdt: torch.dtype, need_pool: bool = True, save: bool = True,
            combine: Optional[Callable] = None, patches: Optional[torch.Tensor] = None,
            beside: bool = False, pos_grid: Optional[tuple] = None, keep_first_act: Optional[bool] = None,
            minus: Optional[torch.Tensor] = None, alpha: float = 1.0):
    """z (S, B, D) in the acc dtype (None without pool), f (S, B, L, D) in cdt, and the ctx.

    images: (S, B, C, S_px, S_px); pos_in (L, d) and pos_out (L, D) in cdt: the rows computed
    (the whole grid, or a slice); ``combine(sbar, lse) -> (sbar, lse)`` puts the pool's slices
    together (across ranks) before the output projections. w: weights (S, *shape) in any float
    dtype (cast to cdt for the GEMMs, to acc for the small pieces). ``patches``: the images
    already unfolded (``unfold_patches``, acc dtype), for a caller that keeps them across steps
    (``images`` is then not read and may be None). ``beside``: the trigger, u and the pool's query
    projections on a second stream beside the GEMMs (:class:`Beside`; CUDA only).
    ``pos_grid`` (height, width): ``pos_in`` is that whole grid of the position code, row
    y * width + x (``position_code(pos_dim, height, width)``); the position product is then
    computed from the code's separable form (:func:`position_product`).
    ``keep_first_act`` (with ``save``): the first layer's activation ReLU(P + u) written out once
    and kept in the ctx for the backward (None: the table's ``first_layer_act_kept``). Kept and
    with ``pos_grid``, the activation is made straight from Q, the code's separable products
    (``first_layer_act(q, u, grid=)``): P is never written, and the ctx holds no P.
    ``minus`` (S, D, with the pool): alpha (z - minus) in z's place (the TTT step's loss gradient,
    minus its targets and alpha 2 / D: the bias less the targets made beside, then the output
    product adds to them; :func:`pool_output`).
    """
    acc = acc_dtype_for(cdt)
    side = Beside(pos_in.device, beside)
    pool = config.pool and need_pool
    q = kt = start = None
    with side(minus):                    # none of it needs the position GEMM
        patches, t, u = trigger_split(w, images, config, acc, patches=patches)
        have_u = side.mark()
        if pool:
            q, kt, scale = pool_query(prim, w, config, acc)
            if minus is not None:
                start = output_start(w, minus, alpha, patches.shape[1], acc)
    keep = save and keeps_first_act(prim, keep_first_act)
    wp = w["mlp.0.weight"][:, :, config.pos_dim:]
    halves = None
    if keep and pos_grid is not None:
        _grid_rows(pos_in, pos_grid)
        p, halves = None, _position_q(prim, wp, pos_grid, cdt)[0]             # S (W + H) H1, acc
    else:
        p = position_product(prim, wp, pos_in, cdt, grid=pos_grid)            # S L H1
    side.join(patches, t, u, upto=have_u)
    s, b = patches.shape[:2]
    acts = [] if save else None
    h = column_mlp(prim, w, config, p, u, cdt, acts=acts, keep_first=keep, halves=halves, grid=pos_grid)
    f = h.view(s, b, pos_in.shape[0], config.dim)
    z = sbar = lse = o = None
    side.join(q, kt, start)
    if pool:
        sbar, lse = prim.pool_fwd(f, pos_out, kt, scale)
        if combine is not None:
            sbar, lse = combine(sbar, lse)
        o, z = pool_output(prim, w, config, sbar, acc, start=start, alpha=alpha)
    ctx = FusedCtx(patches, t, u, p, acts, f, q, kt, sbar, lse, o, cdt) if save else None
    return z, f, ctx


def keeps_first_act(prim, keep: Optional[bool] = None) -> bool:
    """Whether a forward followed by a backward keeps the first layer's activation for it:
    ``keep``, or where it is None the table's ``first_layer_act_kept``."""
    return bool(getattr(prim, "first_layer_act_kept", False) if keep is None else keep)


def trigger_split(w, images, config, acc, *, patches=None):
    """The per-image pieces in the acc dtype: patches (S, B, L, C p p) (unfolded from ``images``
    unless given), the trigger t (S, B, d) and u = W_T t + b1 (S, B, H1)."""
    if patches is None:
        patches = unfold_patches(images.to(acc), config.patch)                    # S B L Cpp
    s = patches.shape[0]
    cw = w["conv.weight"].reshape(s, -1).to(acc)
    t = torch.einsum("sblk,sk->sbl", patches, cw) + w["conv.bias"].reshape(s, 1, 1).to(acc)
    return patches, t, trigger_u(w, t, config, acc)


def trigger_u(w, t, config, acc):
    """u = W_T t + b1 (S, B, H1) of triggers t (S, B, d): all a column needs of its image. Any
    trigger will do, not only a conv's output (perceptual interpolation feeds mixed ones)."""
    w1t = _trigger_weight(w, config)
    return bmm_acc(t.to(w1t.dtype), w1t.transpose(1, 2), acc) + w["mlp.0.bias"].to(acc)[:, None, :]


def _split_terms(x, out):
    """x (S, n, H1) in the acc dtype into ``out`` (S, 2 n, H1) in the compute dtype (any
    strides): [hi; lo] with hi = x rounded and lo = x - hi rounded, so that hi + lo is x to about
    2^-16 relative in bf16 (a product with [A | A] or [A; A] then sums both terms). Returns
    ``out``."""
    n = x.shape[1]
    out[:, :n].copy_(x)
    torch.sub(x, out[:, :n], out=out[:, n:])
    return out


def position_product(prim, wp, pos_in, cdt, *, grid: Optional[tuple] = None):
    """P = pos_in W_P^T (S, L, H1) in cdt, W_P = ``wp`` (S, H1, d): one GEMM over the L rows, or
    with ``grid`` (pos_in is that whole height x width grid of the code, row y * width + x) from
    the code's separable form pos = E C (:func:`apm_fast.posenc.position_factors`): Q = C W_P^T, the (width + height)
    rows P_x[x] and P_y[y], then P = E Q (P[y * width + x] = P_x[x] + P_y[y]; exact algebra). For
    ``ttt-l14``: 0.54 + 1.07 GFLOP in bf16 (Q, then a product with 128 columns: hi + lo terms)
    instead of 8.6."""
    if grid is None:
        return prim.linear(pos_in, wp.to(cdt), None, out_dtype=cdt)
    _grid_rows(pos_in, grid)
    height, width = grid
    q, e = _position_q(prim, wp, grid, cdt)                                   # S (W + H) H1
    acc = q.dtype
    if acc == cdt:
        return prim.linear(e, q.transpose(1, 2).contiguous(), None, out_dtype=cdt)
    s, n, h1 = q.shape
    qt = torch.empty((s, h1, 2 * n), dtype=cdt, device=q.device)            # [Q_hi; Q_lo]^T
    _split_terms(q, qt.transpose(1, 2))
    e2 = position_factors(wp.shape[-1], height, width, terms=2, dtype=cdt, device=wp.device)[1]
    return prim.linear(e2, qt, None, out_dtype=cdt)


def _position_q(prim, wp, grid: tuple, cdt):
    """Q = C W_P^T (S, width + height, H1) in the acc dtype, the rows P_x[x] then P_y[y] of the
    code's separable form (:func:`position_product`), and the code's 0/1 factor E."""
    c, e = position_factors(wp.shape[-1], grid[0], grid[1], dtype=cdt, device=wp.device)
    return prim.linear(c, wp.to(cdt), None, out_dtype=acc_dtype_for(cdt)), e


def position_weight_grad(prim, g1, pos_in, *, grid: Optional[tuple] = None, out=None):
    """dW_P = g1^T pos_in (S, H1, d) in the acc dtype (into ``out`` when given) from g1 (S, L, H1):
    one GEMM over the L rows, or with ``grid`` (as :func:`position_product`) dW_P = G^T C from
    G = E^T g1 (:func:`_grid_sums`). With 16-bit g1, G (fp32) enters its product as hi + lo
    terms, so dW_P is as accurate as the one GEMM's."""
    if grid is None:
        return prim.linear_bwd_weight(g1, pos_in, bias=False, out=out)[0]
    _grid_rows(pos_in, grid)
    height, width = grid
    d = pos_in.shape[1]
    gg = _grid_sums(g1, d, grid, acc_dtype_for(g1.dtype))                   # S (W + H) H1
    if gg.dtype == g1.dtype:
        c = position_factors(d, height, width, dtype=g1.dtype, device=g1.device)[0]
        return prim.linear_bwd_weight(gg, c, bias=False, out=out)[0]
    s, n, h1 = gg.shape
    g2 = _split_terms(gg, torch.empty((s, 2 * n, h1), dtype=g1.dtype, device=g1.device))
    c2 = position_factors(d, height, width, terms=2, dtype=g1.dtype, device=g1.device)[0]
    return prim.linear_bwd_weight(g2, c2, bias=False, out=out)[0]


def position_weight_factors(g1, d: int, grid: tuple, acc) -> List[tuple]:
    """dW_P = g1^T pos (S, H1, d) by its factors, from the code's separable form (``grid`` and g1
    as :func:`position_weight_grad`'s): [(c0, c1, a, b)], dW_P[:, :, c0:c1] = sum_k a[:, k]^T
    b[:, k] (``adam_``'s ``outer``), nothing of dW_P written. G = E^T g1 (:func:`_grid_sums`):
    its first ``width`` rows pair with the code's x half X (width, hx) on columns :hx, the rest
    with the y half on hx:; the halves as g1's dtype rounds them (the code a GEMM in it reads),
    in ``acc``."""
    height, width = grid
    s = g1.shape[0]
    gg = _grid_sums(g1, d, grid, acc)
    xs, ys = position_halves(d, height, width, dtype=acc, rounded=g1.dtype, device=g1.device)
    hx = xs.shape[1]
    return [(0, hx, gg[:, :width], xs.expand(s, *xs.shape)), (hx, d, gg[:, width:], ys.expand(s, *ys.shape))]


def _grid_sums(g1, d: int, grid: tuple, acc) -> torch.Tensor:
    """G = E^T g1 (S, width + height, H1) in ``acc`` from g1 (S, L, H1) over the whole grid: the
    sums of g1 over each column x of the grid (the first ``width`` rows), then over each row y;
    one product with the code's shared 0/1 factor E (:func:`apm_fast.posenc.position_factors`)."""
    et = position_factors(d, grid[0], grid[1], dtype=g1.dtype, device=g1.device)[1].t()    # (W + H) L
    return bmm_acc(et.expand(g1.shape[0], *et.shape), g1, acc)


def _grid_rows(pos_in, grid):
    if pos_in.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"pos_grid: expected pos_in to hold the {grid[0]} x {grid[1]} grid's "
                         f"{grid[0] * grid[1]} rows, it has {pos_in.shape[0]}")


def _trigger_weight(w, config):
    """W_T, the first layer's trigger half (S, H1, d): a view, in whatever dtype ``w`` holds it.
    Products with it run in that dtype with an ``acc`` result (bmm_acc): a 16-bit copy is read as
    it is, never widened into a temporary (what autocast does with the first layer too)."""
    return w["mlp.0.weight"][:, :, :config.pos_dim]


def column_mlp(prim, w, config, p, u, cdt, *, acts=None, keep_first: bool = False, halves=None, grid=None):
    """The columns after the position GEMM: ReLU(P + u) fed to the second layer (built on the fly,
    never stored), every further layer, the head. Returns (S, B * rows of p, D) in cdt; ``acts``
    (a list) receives the inputs of the layers from the first consumer on (what the backward
    needs): first ReLU(P + u), written out by ``prim.first_layer_act`` and read by a plain GEMM
    when ``keep_first``, else None (the backward builds it again), then the stored activations.
    ``halves`` (with ``keep_first`` and ``grid``, ``p`` None): P given by the code's separable
    products Q (:func:`position_product`), the activation made from them."""
    layers = _layers(w, config)
    w2, b2, r2 = layers[0]
    if acts is not None and keep_first:
        a = (prim.first_layer_act(p, u) if halves is None
             else prim.first_layer_act(halves, u, grid=grid, out_dtype=cdt))
        acts.append(a)
        h = prim.linear(a, w2.to(cdt), b2.to(cdt), relu=r2, out_dtype=cdt)
    else:
        if acts is not None:
            acts.append(None)
        h = prim.first_layer_linear(p, u, w2.to(cdt), b2.to(cdt), relu=r2, out_dtype=cdt)
    for wk, bk, rk in layers[1:]:
        if acts is not None:
            acts.append(h)
        h = prim.linear(h, wk.to(cdt), bk.to(cdt), relu=rk, out_dtype=cdt)
    return h


def pool_query(prim, w, config, acc):
    """The single query's projections: q (S, D), k~ = per-head q W_K (S, H, D), the score scale."""
    s = w["query"].shape[0]
    dim, heads = config.dim, config.heads
    dh = dim // heads
    wq, wk_, _ = w["attn.in_proj_weight"].to(acc).chunk(3, dim=1)
    bq = w["attn.in_proj_bias"].to(acc).chunk(3, dim=1)[0]
    q = torch.einsum("sek,sk->se", wq, w["query"].to(acc)) + bq                 # S D
    kt = prim.heads_product(q.view(s, 1, heads, dh), wk_)[:, 0]
    return q, kt, 1.0 / math.sqrt(dh)


def pool_output(prim, w, config, sbar, acc, *, start: Optional[torch.Tensor] = None, alpha: float = 1.0):
    """o = per-head W_V sbar + b_V (S, B, D) and z = W_O o + b_O (S, B, D) from the softmax-weighted
    sums sbar (S, B, H, D). With ``start`` (S, B, D, the acc dtype), a buffer that holds
    alpha (b_O - t) for some t: it becomes alpha (z - t) in place, returned in z's place (one
    product that adds to it, where z alone copies b_O into a new result first; see
    :func:`output_start`)."""
    s, b = sbar.shape[:2]
    dim, heads = config.dim, config.heads
    dh = dim // heads
    wv = w["attn.in_proj_weight"].to(acc).chunk(3, dim=1)[2]
    bv = w["attn.in_proj_bias"].to(acc).chunk(3, dim=1)[2]
    o = prim.heads_product(sbar.to(acc), wv, transpose=True).reshape(s, b, dim) + bv[:, None, :]
    wo = w["attn.out_proj.weight"].to(acc)
    if start is not None:
        return o, start.baddbmm_(o, wo.transpose(1, 2), alpha=alpha)
    z = torch.baddbmm(w["attn.out_proj.bias"].to(acc)[:, None, :], o, wo.transpose(1, 2))
    return o, z


def output_start(w, minus: torch.Tensor, alpha: float, images: int, acc) -> torch.Tensor:
    """alpha (b_O - minus) (S, ``images``, D) in the acc dtype: :func:`pool_output`'s ``start``
    for alpha (z - minus), made before the pool (it reads only the output bias and ``minus``
    (S, D))."""
    s, dim = minus.shape
    start = torch.sub(w["attn.out_proj.bias"].to(acc), minus.to(acc)).mul_(alpha)[:, None, :]
    return start if images == 1 else start.expand(s, images, dim).contiguous()


def combine_pool(sbar: torch.Tensor, lse: torch.Tensor, dim: int = 0):
    """The pool over the union of row slices from each slice's (sbar, lse), stacked along ``dim``:

        lse = logsumexp_k lse_k,   sbar = sum_k sbar_k exp(lse_k - lse)

    exact (the softmax of the union, re-weighted). A slice without rows has lse = -inf and
    weighs nothing. sbar (..., K, ..., H, D) and lse (..., K, ..., H) in the acc dtype."""
    lse_all = torch.logsumexp(lse, dim=dim)
    weight = torch.exp(lse - lse_all.unsqueeze(dim)).nan_to_num_(0.0)     # -inf - -inf: empty
    return (sbar * weight.unsqueeze(-1)).sum(dim), lse_all


def rgb_head(w, config, f, t, pos_in):
    """The RGB head on [f ; T ; pos] without building the column: its first layer split in three.
    f (B, L, D), t (B, d), pos_in (L, d); ``w`` holds the ``rgb.*`` parameters."""
    dim, d = config.dim, config.pos_dim
    w0 = w["rgb.0.weight"]
    h = (F.linear(f, w0[:, :dim], w["rgb.0.bias"]) + F.linear(t, w0[:, dim:dim + d])[:, None, :]
         + F.linear(pos_in, w0[:, dim + d:])[None])
    h = F.linear(F.relu(h), w["rgb.2.weight"], w["rgb.2.bias"])
    return F.relu(F.linear(F.relu(h), w["rgb.4.weight"], w["rgb.4.bias"]))


_FOLD = 64      # chunks whose pool results are kept before columns() folds them into one


def _column_names(w):
    """The column weights columns() feeds to GEMMs in the compute dtype (all but the first layer)."""
    return [n for n in w if n.startswith(("mlp.", "head.")) and n != "mlp.0.weight"]


def _chunk(prim, w, wp, u, kt, scale, config, cdt, g, cells):
    """One chunk of :func:`columns`: the features f (1, B, rows, D) of the query cells ``cells``
    (indices into the g x g grid, on the device) and, with a pool, the chunk's (sbar, lse)."""
    c = config
    p = prim.linear(position_cells(c.pos_dim, g, g, cells, dtype=cdt), wp, None, out_dtype=cdt)
    f = column_mlp(prim, w, c, p, u, cdt).view(1, u.shape[1], cells.numel(), c.dim)
    del p
    part = prim.pool_fwd(f, position_cells(c.dim, g, g, cells, dtype=cdt), kt, scale) if c.pool else None
    return f, part


class _ChunkGraph(KeptGraph):
    """One chunk of :func:`columns` captured once as a CUDA graph and replayed at any row offset:
    the host enqueues one replay per chunk instead of the chunk's few dozen launches (the eager
    chunk loop is bound by the host). It reads only its own static buffers: the compute-dtype
    copies of the column weights, u and k~ (refreshed by :meth:`load` on every call) and the
    offset (a device scalar); the pool's (sbar, lse) over the chunks replayed since ``load`` are
    folded inside the graph. Without a capture (the CPU, a failed capture) :meth:`replay` runs
    the same function eagerly."""

    def __init__(self, prim, w, u, kt, scale, config, cdt, g, chunk):
        c, dev = config, u.device
        super().__init__(dev)
        self.prim, self.config, self.cdt, self.g, self.scale = prim, config, cdt, g, scale
        self.acc = acc = acc_dtype_for(cdt)
        b = u.shape[1]
        self.w = {n: torch.empty(w[n].shape, dtype=cdt, device=dev) for n in _column_names(w)}
        wp = w["mlp.0.weight"][:, :, c.pos_dim:]
        self.wp = torch.empty(wp.shape, dtype=cdt, device=dev)
        self.u = torch.empty_like(u)
        self.kt = None if kt is None else torch.empty_like(kt)
        self.base = torch.zeros((), dtype=torch.long, device=dev)
        self.steps = torch.arange(chunk, device=dev)
        self.sbar = torch.zeros((1, b, c.heads, c.dim), device=dev, dtype=acc)
        self.lse = torch.full((1, b, c.heads), -math.inf, device=dev, dtype=acc)
        self.f = None
        self.load(w, u, kt)
        self.capture(self._run, self.restart, f"columns/{getattr(prim, 'name', '?')}/chunk={chunk}/grid={g}/B={b}")

    def load(self, w, u, kt):
        """This call's inputs into the static buffers (cast to the compute dtype on the way)."""
        for n, t in self.w.items():
            t.copy_(w[n])
        self.wp.copy_(w["mlp.0.weight"][:, :, self.config.pos_dim:])
        self.u.copy_(u)
        if kt is not None:
            self.kt.copy_(kt)
        self.restart()

    def restart(self):
        self.base.zero_()
        self.sbar.zero_()
        self.lse.fill_(-math.inf)

    def _run(self):
        f, part = _chunk(self.prim, self.w, self.wp, self.u, self.kt, self.scale, self.config, self.cdt, self.g,
                         self.steps + self.base)
        self.f = f
        if part is not None:
            sbar, lse = combine_pool(torch.stack([self.sbar, part[0].to(self.acc)]),
                                     torch.stack([self.lse, part[1].to(self.acc)]))
            self.sbar.copy_(sbar)
            self.lse.copy_(lse)

    def rows(self, a: int):
        """The chunk of rows a : a + chunk; its features land in ``self.f``."""
        self.base.fill_(a)
        self.replay()


_CHUNK_GRAPH = cache()       # the one captured chunk kept (its memory is a chunk's activations)


def _chunk_graph(prim, w, u, kt, scale, config, cdt, g, chunk) -> _ChunkGraph:
    """The captured chunk for these shapes (built, and captured on this call's inputs, on a miss);
    the caller loads its inputs under ``exclusive()``."""
    key = (getattr(prim, "name", "?"), id(prim), str(u.device), cdt, config, g, chunk, tuple(u.shape), u.dtype,
           kt is None, torch.is_inference_mode_enabled())
    return kept(_CHUNK_GRAPH, key, lambda: _ChunkGraph(prim, w, u, kt, scale, config, cdt, g, chunk))


@torch.no_grad()
def columns(prim, w, images: torch.Tensor, config, *, cdt: torch.dtype, chunk: int = 4096,
            query_grid: int | None = None, rows: tuple | None = None, want_grid: bool = True,
            combine: Optional[Callable] = None, trigger: Optional[torch.Tensor] = None,
            graphs: bool | None = None):
    """Inference over any set of location queries, ``chunk`` at a time (memory bounded by the
    chunk, not by the number of queries): rows ``rows = (start, stop)`` (default: all) of a
    ``query_grid`` x ``query_grid`` grid (default: the model's). Per chunk: the position GEMM of
    its rows, the fused column MLP and the pool over the chunk, folded in by :func:`combine_pool`;
    ``combine`` then puts slices computed elsewhere (other ranks) together.
    images (B, C, H, W); w: weights with S = 1. ``trigger`` (B, d): ask the columns with these
    triggers instead of the images' own (``images`` may then be None): the MLP only ever sees an
    image through its trigger. ``graphs``: replay the full chunks from one captured CUDA graph
    (:class:`_ChunkGraph`; None: on CUDA when there are at least two full chunks; the last,
    partial chunk runs eagerly). Returns (cls (B, D) acc dtype or None, grid (B, stop - start, D)
    in cdt or None)."""
    from ..validation import _positive_int

    _positive_int("chunk", chunk)                   # a negative chunk would leave the grid unwritten
    _positive_int("query_grid", query_grid, none_ok=True)
    c = config
    g = c.grid if query_grid is None else query_grid
    start, stop = rows if rows is not None else (0, g * g)
    acc = acc_dtype_for(cdt)
    if trigger is None:
        _, _, u = trigger_split(w, images.unsqueeze(0), c, acc)                   # 1 B H1
    else:
        u = trigger_u(w, trigger.unsqueeze(0), c, acc)
    dev = u.device
    b = u.shape[1]
    kt = scale = None
    if c.pool:
        _, kt, scale = pool_query(prim, w, c, acc)
    full = (stop - start) // chunk
    if graphs is None:
        graphs = dev.type == "cuda" and full >= 2
    graph = _chunk_graph(prim, w, u, kt, scale, c, cdt, g, chunk) if graphs and full else None
    # a kept graph's static buffers serve one call at a time (KeptGraph.exclusive)
    with graph.exclusive() if graph is not None else contextlib.nullcontext():
        if graph is not None:                # the partial chunk reads the same copies
            graph.load(w, u, kt)
            cw, wp, u, kt = graph.w, graph.wp, graph.u, graph.kt
        else:                                # the column weights in the compute dtype once, not per chunk
            wp = w["mlp.0.weight"][:, :, c.pos_dim:].to(cdt)
            cw = {n: w[n].to(cdt) for n in _column_names(w)}
        grid = torch.empty((b, stop - start, c.dim), device=dev, dtype=cdt) if want_grid else None
        sbar = torch.zeros((1, b, c.heads, c.dim), device=dev, dtype=acc)
        lse = torch.full((1, b, c.heads), -math.inf, device=dev, dtype=acc)
        parts = [], []                 # the chunks' (sbar, lse), put together by combine_pool in batches

        def fold(sbar, lse):
            out = combine_pool(torch.stack([sbar] + parts[0]), torch.stack([lse] + parts[1]))
            parts[0].clear()
            parts[1].clear()
            return out

        a = start
        if graph is not None:
            for _ in range(full):
                graph.rows(a)
                if grid is not None:
                    grid[:, a - start:a - start + chunk] = graph.f[0]
                a += chunk
            if c.pool:
                parts[0].append(graph.sbar)
                parts[1].append(graph.lse)
        for a in range(a, stop, chunk):
            e = min(stop, a + chunk)
            f, part = _chunk(prim, cw, wp, u, kt, scale, c, cdt, g, torch.arange(a, e, device=dev))
            if grid is not None:
                grid[:, a - start:e - start] = f[0]
            if c.pool:
                parts[0].append(part[0].to(acc))
                parts[1].append(part[1].to(acc))
                if len(parts[0]) == _FOLD:
                    sbar, lse = fold(sbar, lse)
            del f
        if parts[0]:
            sbar, lse = fold(sbar, lse)
    if not c.pool:
        return None, grid
    if combine is not None:
        sbar, lse = combine(sbar, lse)
    return pool_output(prim, w, c, sbar, acc)[1][0], grid


def backward(prim, w: Dict[str, torch.Tensor], ctx: FusedCtx, dz: Optional[torch.Tensor], config,
             pos_in, pos_out, *, df_extra: Optional[torch.Tensor] = None,
             grad_out: Optional[Dict[str, torch.Tensor]] = None, release: bool = False,
             reduce: Optional[Callable] = None, parts: int = 1,
             on_done: Optional[Callable] = None, beside: bool = False,
             wgrad_beside: bool = True, factors: Optional[dict] = None, factored=(FIRST_WEIGHT,),
             pos_grid: Optional[tuple] = None, on_tail: Optional[Callable] = None,
             image_grad: bool = False) -> Dict[str, torch.Tensor]:
    """Gradients of every name in ``weight_names(config)`` (acc dtype, shaped like ``w``) given
    dz = dloss/dz (S, B, D) and optionally df_extra = dloss/df (S, B, L, D). With ``grad_out``
    (a dict of preallocated views, e.g. into one flat buffer) the results land there, written in
    place by the weight-gradient primitives where the dtype allows.
    ``release``: drop each activation saved in ``ctx`` once its last use is past (lower peak
    memory; ``ctx`` cannot be used again).
    ``parts`` > 1: this call holds one of ``parts`` slices of the rows (the forward's ``combine``
    joined them); every gradient returned is then this slice's share, and the sum of the shares
    over all slices is the gradient. ``reduce(t)`` sums a tensor over the slices in place (the
    one exchange the backward needs: dL/dsbar, whose shares the pool's backward needs whole).
    ``on_done(names)`` is called, in the stream order of the work, once the gradients of
    ``names`` are final and the backward reads neither them nor those weights again (the engine
    starts their optimizer update there, beside the rest of the backward), on the stream that
    did that work (the current stream when it is called); every name is announced once, the last
    ones when the backward returns. Layers are announced in the order their gradients are done:
    the head and the MLP's layers last to first, the pool's parameters (made beside the GEMMs)
    before the first consumer (the layer after the first), the first layer before the first
    consumer, the conv last. ``on_tail()`` is called on the main stream once every weight
    gradient is joined there, before the conv's gradients are announced and waited for (the
    last work of the small work's stream): the engine starts there the updates whose gradients
    are final by then, beside the conv's gradients instead of after them.
    ``beside`` (with ``grad_out``): the pool parameters' gradients and the conv's gradients on a
    second stream beside the MLP's GEMMs (:class:`Beside`; CUDA only), and with
    ``wgrad_beside`` each layer's weight gradient on a third one, beside its input gradient (the
    layer is then announced on that stream once both are done); the main stream has waited for
    all of it when the backward returns.
    ``factors`` (a dict, with ``grad_out`` in the acc dtype) and ``factored`` (names of
    :data:`FACTORED`): those weights' gradients are not written but given by their factors (for
    ``adam_``'s ``outer``), put in ``factors`` before the weight is announced. "mlp.0.weight":
    the first layer's trigger columns' gradient, dW_T = sum_b r_b T_b^T (rank B): its factors
    (r (S, B, H1), T (S, B, d)) go to ``factors["mlp.0.weight"]`` and :data:`TRIGGER_COLUMNS` is
    announced, with the first bias, as soon as they are final and the backward no longer reads
    W_T (beside the rest of the first layer's backward); "mlp.0.weight" then stands for its
    position columns only, and its trigger columns in ``grad_out`` are left as they were. With
    ``pos_grid`` the position columns' gradient is not written either: its factors
    (:func:`position_weight_factors`, two column blocks of rank width and height) go to
    ``factors[POSITION_COLUMNS]``. Nothing is put there when the gradient cannot be left out
    (no such views). The pool's "attn.out_proj.weight" (dz^T o, rank B) and
    "attn.in_proj_weight" (:func:`in_proj_weight_factors`, rank 1 + H + B H): their factors go to
    ``factors[name]``, their views in ``grad_out`` are left as they were.
    ``pos_grid``: as :func:`forward`'s (dW_P from the code's separable form, :func:`position_weight_grad`).
    ``image_grad`` (without ``grad_out``): also the gradient with respect to the images, under the
    key ``"images"`` (S, B, C, H, W) in the acc dtype (the trigger's gradient through the conv:
    each patch's is dt times the conv's weight)."""
    cdt = ctx.cdt
    acc = acc_dtype_for(cdt)
    s, b = ctx.t.shape[:2]
    L, d, dim = pos_in.shape[0], config.pos_dim, config.dim
    # with grad_out, each gradient goes into its view as soon as it exists and is dropped: only
    # one layer's gradient is ever alive beside the flat buffer (peak memory of a TTT step)
    g: Dict[str, torch.Tensor] = {} if grad_out is None else _GradSink(grad_out)
    side = Beside(ctx.t.device, beside and grad_out is not None)

    def done(names):
        if on_done is not None:
            on_done(names)

    unknown = sorted(set(factored) - set(FACTORED))
    if unknown:
        raise ValueError(f"factored: unknown weight(s) {unknown}; expected some of {list(FACTORED)}")
    by_factors = set(factored) if factors is not None else set()
    df = None
    pool_grads = bool(config.pool) and dz is not None
    if pool_grads:
        heads = config.heads
        dh = dim // heads
        dz = dz.to(acc) / parts if parts > 1 else dz.to(acc)
        wq, wk_, wv = w["attn.in_proj_weight"].to(acc).chunk(3, dim=1)
        wo = w["attn.out_proj.weight"].to(acc)
        # each gradient is written where it lives (its grad_out view) when there is one
        with side(dz, ctx.o):
            if "attn.out_proj.weight" in by_factors:
                factors["attn.out_proj.weight"] = (dz, ctx.o)
            else:
                _into(g, acc, "attn.out_proj.weight", lambda out: _outer_sum(dz, ctx.o, out))
            _into(g, acc, "attn.out_proj.bias", lambda out: torch.sum(dz, 1, out=out))
        do = torch.einsum("sbe,sek->sbk", dz, wo)                                     # S B D
        dsbar = prim.heads_product(do.view(s, b, heads, dh), wv)
        if reduce is not None:
            reduce(dsbar)                     # the whole dL/dsbar on every slice
        df, dkt = prim.pool_bwd(ctx.f, pos_out, ctx.kt, 1.0 / math.sqrt(dh), ctx.sbar, ctx.lse, dsbar,
                                out_dtype=acc if df_extra is not None else cdt)
        if release:
            ctx.f = None
        # the pool parameters' gradients: nothing after them needs them (beside the MLP's backward)
        with side(dkt, do, ctx.sbar, ctx.q):
            _pool_param_grads(prim, g, w, ctx, dkt, do, wq, wk_, acc,
                              factors if "attn.in_proj_weight" in by_factors else None)
    if df_extra is not None:
        df = df_extra.to(acc) if df is None else df + df_extra.to(acc)
    if df is None:
        raise ValueError("backward: nothing to differentiate (no dz and no df_extra)")
    dy = df.reshape(s, b * L, dim).to(cdt)
    df = None
    layers = _layers(w, config)
    names = [f"mlp.{i}" for i in range(1, len(config.hidden))] + ["head"]

    def weight_grad(fn, idx, *args):
        """fn(*args) into grad_out's views of layer ``idx`` when their dtype allows, else copied."""
        weight, bias = f"{names[idx]}.weight", f"{names[idx]}.bias"
        into = _direct(grad_out, acc, weight, bias)
        dw, db = fn(*args, out=into[0], out_db=into[1])
        if into[0] is None:
            g[weight], g[bias] = dw, db

    # layers after the first consumer, last to first: their inputs are stored activations. Each
    # weight gradient runs beside the input gradient (both read dy); a layer is announced on the
    # weight-gradient stream once both are done (its weights are read by the input gradient).
    # That stream is not the small work's: queued behind the pool parameters' gradients (tens of
    # small kernels) the head's weight gradient would start only after them
    wside = Beside(ctx.t.device, side.on and wgrad_beside, role="wgrad")
    for idx in range(len(layers) - 1, 0, -1):
        wk = layers[idx][0]
        x = ctx.acts[idx]
        with wside(dy, x):
            weight_grad(prim.linear_bwd_weight, idx, dy, x)
        dy = prim.linear_bwd_input(dy, wk.to(cdt), mask=x, out_dtype=cdt)
        with wside():
            done([f"{names[idx]}.weight", f"{names[idx]}.bias"])
        if release:
            ctx.acts[idx] = x = None
    if pool_grads:
        # the pool's parameters, on the stream that made their gradients (beside the MLP's GEMMs,
        # starved by them): announced at the pool's backward, they held up every update queued
        # after theirs; here, they are done before the first layers' gradients are
        with side.resume():
            done(list(_POOL_PARAMS))
    # first consumer: its input ReLU(P + u) as the forward kept it, or built again on the fly
    a = ctx.acts[0]
    with wside(dy, ctx.p, ctx.u, a):
        if a is not None:
            weight_grad(prim.linear_bwd_weight, 0, dy, a)
        else:
            weight_grad(prim.first_layer_bwd_weight, 0, dy, ctx.p, ctx.u)
    g1, r = prim.first_layer_bwd_input(dy, layers[0][0].to(cdt), ctx.p, ctx.u, out_dtype=cdt,
                                       act=a)                                     # S BL H1, S B H1
    dy = a = None
    if release:
        ctx.p = ctx.acts[0] = None
    # first layer, trigger split: dW_P = (sum_b g1_b)^T pos; dW_T = sum_b r_b T_b^T; db1 = sum r
    wp_view = _direct(grad_out, acc, "mlp.0.weight")[0]
    wt_view = wp_view[:, :, :d] if wp_view is not None else None
    wp_view = wp_view[:, :, d:] if wp_view is not None else None
    factored = FIRST_WEIGHT in by_factors and wp_view is not None
    with side(r, ctx.t):                 # the conv's gradients: beside the first layer's
        w1t = _trigger_weight(w, config)
        dt = bmm_acc(r.to(w1t.dtype), w1t, acc)                                   # S B d
        _into(g, acc, "mlp.0.bias", lambda out: torch.sum(r, 1, out=out))        # db1
        wt_read = side.mark()            # the last read of the first layer's weights; db1 made
        if factored:                     # dW_T by its factors, final now: its update may start
            factors["mlp.0.weight"] = (r, ctx.t)
            done([TRIGGER_COLUMNS, "mlp.0.bias"])
        conv_shape = w["conv.weight"].shape
        _into(g, acc, "conv.weight", lambda out: torch.bmm(
            dt.reshape(s, 1, -1), ctx.patches.reshape(s, -1, ctx.patches.shape[-1]),
            out=None if out is None else out.view(s, 1, -1)).reshape(conv_shape))
        _into(g, acc, "conv.bias", lambda out: torch.sum(
            dt, (1, 2), out=None if out is None else out.view(s)).reshape(w["conv.bias"].shape))
        if image_grad:
            if grad_out is not None:
                raise ValueError("image_grad: the images' gradient is returned in a new dict; "
                                 "call without grad_out")
            cw = w["conv.weight"].reshape(s, 1, 1, -1).to(acc)
            g["images"] = fold_patches(dt[..., None] * cw, config.in_chans, config.patch,
                                       (config.grid, config.grid))
    # the first layer's weight gradients on the main stream (its update, the largest with the
    # first consumer's, starts when they are done: beside, starved by the GEMMs and the updates,
    # they finished ~60 us after the dW_P GEMM at one image)
    if not factored:
        dwt = torch.bmm(r.transpose(1, 2), ctx.t, out=wt_view)                    # in place when it can
    h1 = g1.shape[-1]
    g1_sum_b = (g1.view(s, b, L, h1).sum(1) if b > 1 else g1.view(s, L, h1)).to(cdt)
    if factored and pos_grid is not None:   # dW_P by its factors too: never written
        factors[POSITION_COLUMNS] = position_weight_factors(g1_sum_b, pos_in.shape[1], pos_grid, acc)
        dwp = None
    else:
        dwp = position_weight_grad(prim, g1_sum_b, pos_in, grid=pos_grid, out=wp_view)
    g1 = g1_sum_b = None
    if wp_view is None:                     # the two halves put together
        g["mlp.0.weight"] = torch.cat([dwt, dwp.to(acc)], dim=2)
    dwt = dwp = None
    if not factored:
        side.join(upto=wt_read)             # dt has read W_T and db1 is made: the update may start
    done(["mlp.0.weight"] if factored else ["mlp.0.weight", "mlp.0.bias"])
    with wside():                           # after its input gradient too (it reads the weights)
        done([f"{names[0]}.weight", f"{names[0]}.bias"])
    wside.join()                            # every weight gradient
    if on_tail is not None:
        on_tail()
    with side.resume():
        done(["conv.weight", "conv.bias"])
    side.join()                             # the conv's gradients too, before the backward returns
    return grad_out if grad_out is not None else g


# what ``backward`` announces for the first layer's trigger columns when it gives their gradient
# by its factors (``factors``)
TRIGGER_COLUMNS = "mlp.0.weight[trigger]"
# the key of ``factors`` that holds the first layer's position columns' gradient by its factors
# (announced as "mlp.0.weight")
POSITION_COLUMNS = "mlp.0.weight[position]"

_POOL_PARAMS = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "query")


def in_proj_weight_factors(dq, query, q_h, dkt, do_h, sbar):
    """The pool's in-projection gradient [dW_Q; dW_K; dW_V] (S, 3D, D) by its factors (a, b), the
    gradient being sum_k a[:, k, :, None] * b[:, k, None, :]: a (S, 1 + H + B H, 3D) and
    b (S, 1 + H + B H, D). Row 0: dq and the query (dW_Q = dq query^T); rows 1 .. H: head h's
    slice of q (zero outside its rows of dW_K) and dk~_h; the last B H: image b's head h slice of
    do and sbar_{b,h} (dW_V). dq, query (S, D); q_h (S, H, dh); dkt (S, H, D); do_h (S, B, H, dh);
    sbar (S, B, H, D). Each element of the gradient is one product (B of them for dW_V) and zeros,
    so the update's sum over k gives what the written gradient holds."""
    s, b, heads, dh = do_h.shape
    dim = heads * dh
    k = 1 + heads + b * heads
    a = torch.zeros((s, k, 3 * dim), dtype=dq.dtype, device=dq.device)
    a[:, 0, :dim] = dq
    head_blocks(q_h[:, None], out=a[:, 1:1 + heads, dim:2 * dim])
    head_blocks(do_h, out=a[:, 1 + heads:, 2 * dim:])
    bf = torch.cat([query[:, None], dkt, sbar.reshape(s, b * heads, dim)], dim=1)
    return a, bf


def _pool_param_grads(prim, g, w, ctx, dkt, do, wq, wk_, acc, factors=None):
    """The gradients of the pool's query and in-projection (their shares given dk~ (S, H, D) and
    do = dL/do (S, B, D)) into ``g``; with ``factors`` (a dict), the in-projection's by its
    factors into ``factors["attn.in_proj_weight"]`` instead (:func:`in_proj_weight_factors`)."""
    s, b, heads, dim = do.shape[0], do.shape[1], dkt.shape[1], do.shape[2]
    dh = dim // heads
    q_h = ctx.q.view(s, heads, dh)
    dq = prim.heads_product(dkt[:, None], wk_, transpose=True).reshape(s, dim)
    query = w["query"].to(acc)

    def in_proj(out):                    # [dW_Q; dW_K; dW_V], each third written in place
        out = torch.empty((s, 3 * dim, dim), dtype=acc, device=do.device) if out is None else out
        _outer_sum(dq[:, None], query[:, None], out[:, :dim])
        _head_outer_sum(q_h[:, None], dkt[:, None], out[:, dim:2 * dim])
        _head_outer_sum(do.view(s, b, heads, dh), ctx.sbar, out[:, 2 * dim:])
        return out

    def in_proj_bias(out):               # [dq; 0 (the key bias cancels); sum_b do]
        out = torch.empty((s, 3 * dim), dtype=acc, device=do.device) if out is None else out
        out[:, :dim].copy_(dq)
        out[:, dim:2 * dim].zero_()
        torch.sum(do, 1, out=out[:, 2 * dim:])
        return out

    if factors is not None:
        factors["attn.in_proj_weight"] = in_proj_weight_factors(dq, query, q_h, dkt, do.view(s, b, heads, dh),
                                                                ctx.sbar)
    else:
        _into(g, acc, "attn.in_proj_weight", in_proj)
    _into(g, acc, "attn.in_proj_bias", in_proj_bias)
    _into(g, acc, "query", lambda out: torch.bmm(dq[:, None], wq, out=None if out is None else out[:, None])
          .view(s, dim))


def _direct(grad_out, acc, *names):
    """The views of ``grad_out`` the weight-gradient primitives can write into (the acc dtype),
    or Nones (no grad_out, or another dtype: the result is then copied in by ``_GradSink``)."""
    if grad_out is None or any(grad_out[n].dtype != acc for n in names):
        return [None] * len(names)
    return [grad_out[n] for n in names]


def _outer_sum(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_r a[:, r, ..., :, None] * b[:, r, ..., None, :]: a (S, R, ..., I), b (S, R, ..., J) ->
    (S, ..., I, J), written into ``out`` (any strides) when given. One student: a product (one
    image) or a sum of them; several (3-D operands): one matrix product per student, written in
    place into a view with unit inner stride (the in-projection's thirds), not an element-wise
    kernel over broadcast strides."""
    if a.shape[0] > 1 and a.dim() == 3:
        return torch.bmm(a.transpose(1, 2), b, out=out)
    if a.shape[1] == 1:
        return torch.mul(a[:, 0, ..., :, None], b[:, 0, ..., None, :], out=out)
    r = torch.einsum("sb...i,sb...j->s...ij", a, b)
    return r if out is None else out.copy_(r)


def _head_outer_sum(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[s, h dh + d, k] = sum_b x[s, b, h, d] y[s, b, h, k]: x (S, B, H, dh), y (S, B, H, D),
    out (S, D, D) (a view). Several students: the block-diagonal rows of x (``contract.head_blocks``)
    against y, one product per student."""
    s, b, h, dh = x.shape
    if s == 1:
        return _outer_sum(x, y, out.view(s, h, dh, -1))
    return _outer_sum(head_blocks(x), y.reshape(s, b * h, -1), out)


def _into(g, acc, name: str, fn: Callable):
    """g[name] = fn(out): ``out`` is the gradient's own view of ``grad_out`` when it has the acc
    dtype (``fn`` writes there and nothing is copied), else None (``fn`` returns a new tensor)."""
    out = _direct(g.views if isinstance(g, _GradSink) else None, acc, name)[0]
    value = fn(out)
    if out is None:
        g[name] = value


class _GradSink:
    """``sink[name] = grad`` copies into ``views[name]`` at once (see backward)."""

    def __init__(self, views: Dict[str, torch.Tensor]):
        self.views = views

    def __setitem__(self, name: str, value: torch.Tensor):
        view = self.views[name]
        view.copy_(value.reshape(view.shape))
