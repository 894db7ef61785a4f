"""APM inference over any number of location queries, streamed in chunks with bounded memory.

The columns are independent, so the queries can be evaluated ``chunk`` at a time: only one chunk's
position code, activations and pool scores exist at once, and memory does not grow with L (the
optional grid output itself aside). The pieces are those of the ``torch`` backend (trigger split
and single-query pool, spec section 3); the one new part is the pool's softmax over L, which is
combined across chunks exactly with a running maximum (the "online softmax"):

    m' = max(m, max_l s_l),  S' = S e^{m - m'} + sum_l e^{s_l - m'},  A' = A e^{m - m'} + sum_l e^{s_l - m'} kv_l

and z is computed from A / S at the end.

Queries may lie on a finer (or coarser) grid than the model's: the position code is a function of
the cell's (x, y), so ``query_grid`` G_q asks the same MLP about G_q x G_q locations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends.reference import trigger
from ..posenc import position_code

__all__ = ["position_rows", "chunked_forward"]


def position_rows(d: int, height: int, width: int, start: int, stop: int, *, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """Rows ``start:stop`` of ``position_code(d, height, width)``, built from the code's two
    halves (x and y parts, each a function of one coordinate) so that the L x d code is never held.
    """
    if not 0 <= start <= stop <= height * width:
        raise ValueError(f"rows: expected 0 <= start <= stop <= {height * width}, got {start}:{stop}")
    if d % 4 != 0:  # the trimmed code of odd widths is only defined as a whole
        return position_code(d, height, width, dtype=dtype, device=device)[start:stop]
    half = d // 2
    # position_code(d, 1, n)[:, :half] is [sin, cos](n' * freq_k) interleaved for n' < n: the x
    # half for x < width, and (same frequencies, same layout) the y half for y < height
    xs = position_code(d, 1, width, dtype=dtype, device=device)[:, :half]
    ys = position_code(d, 1, height, dtype=dtype, device=device)[:, :half]
    cells = torch.arange(start, stop, device=xs.device)
    return torch.cat([xs[cells % width], ys[cells // width]], dim=1)


def _pool_weights(attn, query):
    """k~ (heads x D) and the value projection, as in the torch backend's single-query pool."""
    dim, heads = attn.embed_dim, attn.num_heads
    dh = dim // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3, dim=0)
    b_q, _, b_v = attn.in_proj_bias.chunk(3, dim=0)
    q = F.linear(query, w_q, b_q).view(heads, dh)
    k_tilde = torch.einsum("hd,hdD->hD", q, w_k.view(heads, dh, dim))
    return k_tilde, w_v.view(heads, dh, dim), b_v.view(heads, dh), dh


@torch.no_grad()
def chunked_forward(model, images: torch.Tensor, *, query_grid: int | None = None,
                    chunk: int = 4096, want_grid: bool = False):
    """(cls, grid) of ``model`` on ``images`` over a ``query_grid`` x ``query_grid`` set of
    locations (default: the model's grid), ``chunk`` queries at a time. ``cls`` is None without a
    pool; ``grid`` (B x L x D) only with ``want_grid``."""
    c = model.config
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    g = c.grid if query_grid is None else query_grid
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"query_grid: expected a positive integer, got {query_grid!r}")
    n_queries = g * g
    t = trigger(model, images)                                    # B x G^2
    b = t.shape[0]
    first = model.mlp[0]
    d = c.pos_dim
    w_t, w_p = first.weight[:, :d], first.weight[:, d:]
    u = F.linear(t, w_t, first.bias)                              # B x H1, once per image
    pool = c.pool
    if pool:
        k_tilde, w_v, b_v, dh = _pool_weights(model.attn, model.query)
        heads = k_tilde.shape[0]
        acc = torch.promote_types(u.dtype, torch.float32)  # softmax statistics in >= fp32
        run_max = torch.full((b, heads), -math.inf, device=t.device, dtype=acc)
        run_sum = torch.zeros((b, heads), device=t.device, dtype=acc)
        run_acc = torch.zeros((b, heads, c.dim), device=t.device, dtype=acc)
    grid = None
    for a in range(0, n_queries, chunk):
        e = min(n_queries, a + chunk)
        pos = position_rows(d, g, g, a, e, dtype=u.dtype, device=u.device)
        h = F.relu(u[:, None, :] + F.linear(pos, w_p)[None])      # B x C x H1
        for lin in model.mlp[1:]:
            h = F.relu(lin(h))
        f = model.head(h)                                         # B x C x D
        if want_grid:
            if grid is None:
                grid = torch.empty((b, n_queries, c.dim), device=f.device, dtype=f.dtype)
            grid[:, a:e] = f
        if pool:
            kv = f + position_rows(c.dim, g, g, a, e, dtype=f.dtype, device=f.device)[None]
            scores = (torch.matmul(kv, k_tilde.t().to(kv.dtype)) / math.sqrt(dh)).to(acc)
            new_max = torch.maximum(run_max, scores.amax(dim=1))  # B x heads
            rescale = torch.exp(run_max - new_max)
            p = torch.exp(scores - new_max[:, None, :])           # B x C x heads
            run_sum = run_sum * rescale + p.sum(dim=1)
            run_acc = run_acc * rescale[..., None] + torch.einsum(
                "bch,bcD->bhD", p.to(kv.dtype), kv).to(acc)
            run_max = new_max
    cls = None
    if pool:
        s = (run_acc / run_sum[..., None]).to(u.dtype)            # B x heads x D
        o = torch.einsum("hdD,bhD->bhd", w_v, s) + b_v
        cls = model.attn.out_proj(o.reshape(b, c.dim))
    return cls, grid
