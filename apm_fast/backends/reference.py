"""The plain form of the APM (spec section 1), kept deliberately naive.

Every column [trigger ; position] is materialized (B x L x 2G^2), every layer runs on it, and the
pool is ``nn.MultiheadAttention`` as the authors call it. Tests compare every fast path against
this one, so it must stay a *different* computation from the rewrites.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_backend

__all__ = ["ReferenceBackend", "columns", "trigger"]


def trigger(model, images: torch.Tensor) -> torch.Tensor:
    """T: B x G^2, the conv's one-channel map flattened row-major (y, x)."""
    return model.conv(images).flatten(1)


def columns(model, images: torch.Tensor) -> torch.Tensor:
    """x: B x L x 2G^2, every location query [T_b ; pos_l] (trigger first)."""
    t = trigger(model, images)
    pos = model.pos_in(dtype=t.dtype, device=t.device)
    b, l = t.shape[0], pos.shape[0]
    return torch.cat([t[:, None, :].expand(b, l, t.shape[1]), pos[None].expand(b, l, pos.shape[1])], dim=-1)


class ReferenceBackend:
    name = "reference"

    def available(self):
        return True, ""

    def forward(self, model, images, *, want_grid=True, want_rgb=None):
        from ..model import APMOutput

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
            z, _ = model.attn(q, kv, kv, need_weights=False)
            cls = z[:, 0]
        rgb = None
        if c.rgb_head and (want_rgb is None or want_rgb):
            rgb = model.rgb(torch.cat([f, x], dim=-1))
        return APMOutput(cls=cls, grid=f if want_grid else None, rgb=rgb)


register_backend(ReferenceBackend())
