"""Column evaluation in chunks of queries: inference over any number of locations with bounded memory.

The columns are independent, so the queries can be evaluated ``chunk`` at a time through the same
primitive table as the whole-image path (``forward_train``): per chunk, the position GEMM of its
rows, the fused column MLP and, with a pool, the pool's forward over the chunk. Only one chunk's
position code, activations and scores exist at once; memory does not grow with the number of
queries (the optional grid output itself aside). The pool's softmax over all queries is combined
exactly from the chunks' (sbar_c, lse_c), the softmax-weighted sums and log-sum-exps that
``pool_fwd`` returns for its rows:

    lse = logaddexp(lse, lse_c),   sbar = sbar e^(lse_old - lse) + sbar_c e^(lse_c - lse)

Queries may lie on another grid than the model's (``query_grid``): the position code is a
function of the cell's (x, y), so the same MLP answers about G_q x G_q locations.
"""
from __future__ import annotations

import math

import torch

from ..posenc import position_rows
from .apm_fused import column_mlp, pool_output, pool_query, trigger_split, weight_names
from .precision import compute_dtype
from .primitives import acc_dtype_for

__all__ = ["columns_forward"]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


@torch.no_grad()
def columns_forward(prim, model, images: torch.Tensor, *, chunk: int = 4096, query_grid: int | None = None,
                    want_grid: bool = True, cdt: torch.dtype | None = None):
    """(cls, grid) of ``model`` on ``images`` (B, C, H, W) through the primitive table ``prim``,
    ``chunk`` queries at a time, over ``query_grid`` x ``query_grid`` locations (default: the
    model's grid). ``cls`` (B, D) is None without a pool; ``grid`` (B, G_q^2, D) only with
    ``want_grid``. Outputs in the model's dtype; no gradients (inference)."""
    c = model.config
    _positive_int("chunk", chunk)
    g = c.grid if query_grid is None else _positive_int("query_grid", query_grid)
    n = g * g
    dev = images.device
    cdt = cdt or compute_dtype(model.dtype, dev)
    acc = acc_dtype_for(cdt)
    params = dict(model.named_parameters())
    w = {k: params[k].detach().unsqueeze(0) for k in weight_names(c)}
    _, _, u = trigger_split(w, images.to(model.dtype).unsqueeze(0), c, acc)             # 1 B H1
    b = images.shape[0]
    wp = w["mlp.0.weight"][:, :, c.pos_dim:].to(cdt)
    grid = torch.empty((b, n, c.dim), device=dev, dtype=model.dtype) if want_grid else None
    kt = scale = sbar = lse = None
    if c.pool:
        _, kt, scale = pool_query(w, c, acc)
        sbar = torch.zeros((1, b, c.heads, c.dim), device=dev, dtype=acc)
        lse = torch.full((1, b, c.heads), -math.inf, device=dev, dtype=acc)
    for a in range(0, n, chunk):
        e = min(n, a + chunk)
        p = prim.linear(position_rows(c.pos_dim, g, g, a, e, dtype=cdt, device=dev), wp, None, out_dtype=cdt)
        f = column_mlp(prim, w, c, p, u, cdt).view(1, b, e - a, c.dim)
        del p
        if grid is not None:
            grid[:, a:e] = f[0]
        if c.pool:
            sb_c, lse_c = prim.pool_fwd(f, position_rows(c.dim, g, g, a, e, dtype=cdt, device=dev), kt, scale)
            new = torch.logaddexp(lse, lse_c.to(acc))
            sbar = sbar * torch.exp(lse - new)[..., None] + sb_c.to(acc) * torch.exp(lse_c.to(acc) - new)[..., None]
            lse = new
        del f
    cls = None
    if c.pool:
        cls = pool_output(w, c, sbar, acc)[1][0].to(model.dtype)
    return cls, grid
