"""The plain form of the APM (spec section 1) and its TTT loop (spec section 2), kept deliberately
naive: the oracle every fast path is tested against (and which no fast path imports).

Every column [trigger ; position] is materialized (B x L x 2G^2), every layer runs on it, and the
pool is ``nn.MultiheadAttention`` as the authors call it; TTT is autograd and ``torch.optim.Adam``,
one image at a time. It must stay a *different* computation from the driver's rewrites.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

__all__ = ["forward", "fit", "trigger", "columns"]


def trigger(model, images: torch.Tensor) -> torch.Tensor:
    """T: B x G^2, the conv's one-channel map flattened row-major (y, x)."""
    return model.conv(images).flatten(1)


def columns(model, images: torch.Tensor) -> torch.Tensor:
    """x: B x L x 2G^2, every location query [T_b ; pos_l] (trigger first)."""
    t = trigger(model, images)
    pos = model.pos_in(dtype=t.dtype, device=t.device)
    b, l = t.shape[0], pos.shape[0]
    return torch.cat([t[:, None, :].expand(b, l, t.shape[1]), pos[None].expand(b, l, pos.shape[1])], dim=-1)


def forward(model, images, *, want_grid=True, want_rgb=None):
    """(cls or None, grid f or None, rgb or None) of ``model`` on ``images``, the plain way."""
    c = model.config
    x = columns(model, images)
    h = x
    for lin in model.mlp:
        h = F.relu(lin(h))
    f = model.head(h)
    cls = None
    if c.pool:
        kv = f + model.pos_out(dtype=f.dtype, device=f.device)[None]
        q = model.query.reshape(1, 1, -1).expand(f.shape[0], 1, -1)
        cls = model.attn(q, kv, kv, need_weights=False)[0][:, 0]
    rgb = None
    if c.rgb_head and (want_rgb is None or want_rgb):
        rgb = model.rgb(torch.cat([f, x], dim=-1))
    return cls, (f if want_grid else None), rgb


def fit(model, images, targets, *, steps, lr, betas=(0.9, 0.999), eps=1e-8, progress=None, start=None):
    """TTT of each image alone (spec section 2) with autograd and ``torch.optim.Adam``: per image,
    ``model`` starts from ``start`` (a {name: tensor} snapshot of its parameters; None: its
    current ones) with fresh Adam state, and its parameters are restored afterwards. Every
    parameter the loss reaches is trained, whatever its ``requires_grad`` (restored too), as the
    engine does. images (B, C, S, S) and targets (B, D) on the model's device and dtype. Returns
    (cls (B, D), losses (B, steps) fp32, seconds per image)."""
    current = {k: p.detach().clone() for k, p in model.named_parameters()}
    start = current if start is None else start
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    kw = {"fused": True} if params and params[0].is_cuda else {}
    cls, losses, seconds = [], [], []
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(images.shape[0]):
            t0 = time.perf_counter()
            image, target = images[i:i + 1], targets[i:i + 1]
            _restore(model, start)
            opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, **kw)
            curve = torch.empty(steps, dtype=torch.float32, device=image.device)
            with torch.enable_grad():
                for s in range(steps):
                    loss = F.mse_loss(forward(model, image, want_grid=False)[0], target)   # mean over D
                    opt.zero_grad(set_to_none=True)         # every step: no accumulation across steps
                    loss.backward()
                    opt.step()
                    curve[s] = loss.detach()                # stays on the device: no sync in the loop
            with torch.no_grad():
                cls.append(forward(model, image, want_grid=False)[0].detach())
            losses.append(curve)
            if image.is_cuda:
                torch.cuda.synchronize(image.device)
            seconds.append(time.perf_counter() - t0)
            if progress is not None:
                progress(1)
    finally:
        _restore(model, current)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return torch.cat(cls), torch.stack(losses), seconds


@torch.no_grad()
def _restore(model, snapshot):
    for k, p in model.named_parameters():
        p.copy_(snapshot[k])
        p.grad = None
