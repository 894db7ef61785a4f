"""The APM computed with the exact rewrites of spec section 3, in plain PyTorch.

* Trigger split: pre1 = u_b + P_l with u_b = W_T T_b + b1 (one vector per image) and
  P = pos W_P^T (shared by all images); the 2G^2-wide column is never built.
* Single-query pool: scores come from k~_h = W_{k,h}^T q_h against the L cells directly, and the
  value projection is applied once to the attention-weighted sum; the L x D key and value
  projections disappear (the key bias is constant per head and cancels in the softmax).

This is the CPU default and the readable twin of the fused GPU kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register_backend
from .reference import trigger

__all__ = ["TorchBackend", "first_layer_split", "single_query_pool"]


def first_layer_split(model, t: torch.Tensor):
    """(u, P): u = W_T T + b1 (B x H1) and P = pos W_P^T (L x H1)."""
    lin = model.mlp[0]
    d = model.config.pos_dim
    w_t, w_p = lin.weight[:, :d], lin.weight[:, d:]
    u = F.linear(t, w_t, lin.bias)
    p = model.pos_in(dtype=t.dtype, device=t.device) @ w_p.t()
    return u, p


def single_query_pool(attn, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """z = MultiheadAttention(query, kv, kv) for a single query vector, B x L x D -> B x D."""
    b, l, dim = kv.shape
    heads = attn.num_heads
    dh = dim // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3, dim=0)
    b_q, _, b_v = attn.in_proj_bias.chunk(3, dim=0)
    q = F.linear(query, w_q, b_q).view(heads, dh)                      # heads x dh
    k_tilde = torch.einsum("hd,hdD->hD", q, w_k.view(heads, dh, dim))   # heads x D
    scores = torch.matmul(kv, k_tilde.t()) / math.sqrt(dh)              # B x L x heads
    a = torch.softmax(scores, dim=1)
    s = torch.einsum("blh,blD->bhD", a, kv)                              # B x heads x D
    o = torch.einsum("hdD,bhD->bhd", w_v.view(heads, dh, dim), s) + b_v.view(heads, dh)
    return attn.out_proj(o.reshape(b, dim))


def rgb_split(model, f, t, pos):
    """The RGB head on [f ; T ; pos] without building the column: its first layer split in three."""
    first, rest = model.rgb[0], model.rgb[1:]
    dim, d = model.config.dim, model.config.pos_dim
    w = first.weight
    pre = (F.linear(f, w[:, :dim], first.bias)
           + F.linear(t, w[:, dim:dim + d])[:, None, :]
           + (pos @ w[:, dim + d:].t())[None])
    return rest(pre)


class TorchBackend:
    name = "torch"

    @property
    def primitives(self):
        """The plain-PyTorch primitive table: what the TTT engine composes for this backend."""
        from ..ops.primitives import TorchPrimitives
        return TorchPrimitives()

    def available(self):
        return True, ""

    def forward(self, model, images, *, want_grid=True, want_rgb=None):
        from ..model import APMOutput

        c = model.config
        t = trigger(model, images)
        u, p = first_layer_split(model, t)
        h = F.relu(u[:, None, :] + p[None])
        for lin in model.mlp[1:]:
            h = F.relu(lin(h))
        f = model.head(h)
        cls = None
        if c.pool:
            kv = f + model.pos_out(dtype=f.dtype, device=f.device)[None]
            cls = single_query_pool(model.attn, model.query, kv)
        rgb = None
        if c.rgb_head and (want_rgb is None or want_rgb):
            rgb = rgb_split(model, f, t, model.pos_in(dtype=f.dtype, device=f.device))
        return APMOutput(cls=cls, grid=f if want_grid else None, rgb=rgb)


register_backend(TorchBackend())
