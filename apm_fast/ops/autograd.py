"""The model's forward over a table as one ``autograd.Function`` (S = 1): the driver's forward,
and its hand-written backward as the Function's backward."""
from __future__ import annotations

import torch

from .driver import backward, forward, weight_names

__all__ = ["fused_forward"]


def _no_autocast(device):
    """Autocast off on ``device`` (a no-op where autocast does not exist, e.g. "meta")."""
    import contextlib

    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu") else contextlib.nullcontext()


class _APMFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prim, model, cdt, images, *params):
        cfg = model.config
        names = weight_names(cfg)
        w = {n: p.detach().unsqueeze(0) for n, p in zip(names, params)}
        pos_in = model.pos_in(dtype=cdt, device=images.device)
        pos_out = model.pos_out(dtype=cdt, device=images.device)
        z, f, fctx = forward(prim, w, images.unsqueeze(0), cfg, pos_in, pos_out, cdt=cdt)
        ctx.prim, ctx.cfg, ctx.names, ctx.w, ctx.fctx = prim, cfg, names, w, fctx
        ctx.pos = (pos_in, pos_out)
        zo = z[0] if z is not None else images.new_zeros(0)
        return zo, f[0]

    @staticmethod
    def backward(ctx, dz, df):
        cfg = ctx.cfg
        has_dz = cfg.pool and dz is not None and dz.numel() > 0
        with _no_autocast(df.device):
            g = backward(ctx.prim, ctx.w, ctx.fctx, dz.unsqueeze(0) if has_dz else None, cfg, *ctx.pos,
                         df_extra=df.unsqueeze(0) if df is not None else None)
        return (None, None, None, None) + tuple(g[n][0].to(ctx.w[n].dtype) for n in ctx.names)


def fused_forward(prim, model, images, cdt: torch.dtype):
    """(cls or None, grid f) of ``model`` on ``images`` (B, C, S, S) through the table ``prim``
    with GEMM operands in ``cdt``, differentiable with respect to the model's parameters (not the
    images). ``cls`` comes in the accumulation dtype, ``f`` in ``cdt``."""
    cfg = model.config
    params = dict(model.named_parameters())
    with _no_autocast(images.device):            # the driver picks its dtypes itself
        z, f = _APMFused.apply(prim, model, cdt, images, *[params[n] for n in weight_names(cfg)])
    return (z if cfg.pool else None), f
