"""The fused APM forward as one autograd.Function over a primitive table (S = 1)."""
from __future__ import annotations

import torch

from .apm_fused import backward_train, forward_train, weight_names
from .precision import compute_dtype

__all__ = ["fused_forward"]


class _APMFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prim, model, cdt, images, *params):
        cfg = model.config
        names = weight_names(cfg)
        w = {n: p.detach().unsqueeze(0) for n, p in zip(names, params)}
        pos_in = model.pos_in(dtype=cdt, device=images.device)
        pos_out = model.pos_out(dtype=cdt, device=images.device)
        z, f, fctx = forward_train(prim, w, images.unsqueeze(0), cfg, pos_in, pos_out, cdt=cdt)
        ctx.prim, ctx.cfg, ctx.names, ctx.w, ctx.fctx = prim, cfg, names, w, fctx
        ctx.pos = (pos_in, pos_out)
        ctx.out_dtype = params[0].dtype
        zo = z[0].to(ctx.out_dtype) if z is not None else images.new_zeros(0)
        return zo, f[0].to(ctx.out_dtype)

    @staticmethod
    def backward(ctx, dz, df):
        cfg = ctx.cfg
        has_dz = cfg.pool and dz is not None and dz.numel() > 0
        g = backward_train(ctx.prim, ctx.w, ctx.fctx, dz.unsqueeze(0) if has_dz else None, cfg,
                           *ctx.pos, df_extra=df.unsqueeze(0) if df is not None else None)
        return (None, None, None, None) + tuple(g[n][0].to(ctx.out_dtype) for n in ctx.names)


def fused_forward(prim, model, images):
    """(cls or None, grid f) of ``model`` on ``images`` (B, C, S, S) through ``prim``,
    differentiable with respect to the model's parameters (not the images)."""
    cfg = model.config
    params = dict(model.named_parameters())
    cdt = compute_dtype(model.dtype, images.device)
    z, f = _APMFused.apply(prim, model, cdt, images.to(model.dtype),
                           *[params[n] for n in weight_names(cfg)])
    return (z if cfg.pool else None), f
