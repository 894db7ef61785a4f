"""The primitive contract shared by every fused backend, and its plain-PyTorch implementation.

A fused backend (Triton, CUDA) is a *primitive table*: an object with the methods of
:class:`TorchPrimitives`, same arguments, same shapes, same semantics. The driver in
``apm_fused.py`` composes them into the whole APM forward and backward (spec section 3), so every
backend runs exactly the same algebra and differs only in how each primitive is computed.
``TorchPrimitives`` is the readable definition and the oracle the kernel tests compare against
(besides the reference model).

Conventions
-----------
* Every per-student tensor carries a leading student dimension ``S`` (S independent students,
  each with its own weights and images; S = 1 is the common case). A tensor shared by all
  students (the position codes) has no S dimension.
* ``B`` images per student, ``L`` location queries per image, rows ``M = B * L`` ordered
  (b, l) with l fastest.
* GEMM operands are in the *compute dtype* (bf16 on GPU by default; fp32; fp64 in CPU tests);
  accumulation is at least fp32. Outputs are in ``out_dtype`` (default: the operands' dtype).
* Weight and bias gradients are returned in ``acc_dtype`` (fp32, or fp64 for fp64 operands).
* No primitive may keep state between calls (graph capture replays them).
"""
from __future__ import annotations

import torch

__all__ = ["TorchPrimitives", "acc_dtype_for"]


def acc_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit operands, otherwise the operands' own."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bcast(x: torch.Tensor, s: int) -> torch.Tensor:
    """(M, K) shared operand -> (S, M, K) view; (S, M, K) unchanged."""
    return x.unsqueeze(0).expand(s, *x.shape) if x.dim() == 2 else x


class TorchPrimitives:
    """Plain PyTorch primitives (any device, any dtype)."""

    name = "torch"

    # ---------------------------------------------------------------- forward GEMMs
    def linear(self, x, w, b=None, *, relu=False, out_dtype=None):
        """y = x w^T (+ b) (ReLU).  x: (S, M, K) or shared (M, K); w: (S, N, K); b: (S, N) or None.
        Returns (S, M, N)."""
        out_dtype = out_dtype or w.dtype
        acc = acc_dtype_for(w.dtype)
        y = torch.bmm(_bcast(x, w.shape[0]).to(acc), w.to(acc).transpose(1, 2))
        if b is not None:
            y = y + b.to(acc)[:, None, :]
        if relu:
            y = torch.relu(y)
        return y.to(out_dtype)

    def first_layer_linear(self, p, u, w, b, *, relu=True, out_dtype=None):
        """The first layer's activation built on the fly and fed to the next layer:
        A[s, b*L + l] = ReLU(p[s, l] + u[s, b]);  y = A w^T + b (ReLU).
        p: (S, L, H1) compute dtype; u: (S, B, H1) acc dtype; w: (S, N, H1); b: (S, N).
        Returns (S, B*L, N). The B*L x H1 activation is never required in memory."""
        s, l, h1 = p.shape
        a = self.first_layer_act(p, u)
        return self.linear(a, w, b, relu=relu, out_dtype=out_dtype)

    def first_layer_act(self, p, u):
        """ReLU(p[s, l] + u[s, b]) as (S, B*L, H1) in p's dtype (used where it must exist)."""
        s, l, h1 = p.shape
        acc = acc_dtype_for(p.dtype)
        a = torch.relu(p.to(acc)[:, None, :, :] + u.to(acc)[:, :, None, :])
        return a.reshape(s, -1, h1).to(p.dtype)

    # ---------------------------------------------------------------- backward GEMMs
    def linear_bwd_input(self, dy, w, *, mask=None, out_dtype=None):
        """dx = dy w, times (mask > 0) when ``mask`` (the layer's input activation, (S, M, K)) is
        given: the ReLU that produced the input. dy: (S, M, N); w: (S, N, K). Returns (S, M, K)."""
        out_dtype = out_dtype or w.dtype
        acc = acc_dtype_for(w.dtype)
        dx = torch.bmm(dy.to(acc), w.to(acc))
        if mask is not None:
            dx = dx * (mask > 0)
        return dx.to(out_dtype)

    def linear_bwd_weight(self, dy, x, *, bias=True):
        """dw = sum_m dy[m]^T x[m] and db = sum_m dy[m].  dy: (S, M, N); x: (S, M, K) or shared
        (M, K). Returns (dw (S, N, K), db (S, N) or None) in the acc dtype."""
        acc = acc_dtype_for(dy.dtype)
        dw = torch.bmm(dy.to(acc).transpose(1, 2), _bcast(x, dy.shape[0]).to(acc))
        db = dy.to(acc).sum(1) if bias else None
        return dw, db

    def first_layer_bwd_weight(self, dy, p, u, *, bias=True):
        """linear_bwd_weight with x = ReLU(p + u) rebuilt on the fly (see first_layer_linear)."""
        return self.linear_bwd_weight(dy, self.first_layer_act(p, u), bias=bias)

    def first_layer_bwd_input(self, dy, w, p, u, *, out_dtype=None):
        """g1 = (dy w) * (p[l] + u[b] > 0): the gradient at the first layer's pre-activation,
        and r = sum_l g1 per image. dy: (S, B*L, N); w: (S, N, H1). Returns (g1 (S, B*L, H1) in
        out_dtype, r (S, B, H1) in the acc dtype)."""
        s, l, h1 = p.shape
        acc = acc_dtype_for(w.dtype)
        g = torch.bmm(dy.to(acc), w.to(acc))
        pre = p.to(acc)[:, None, :, :] + u.to(acc)[:, :, None, :]
        g = g.view(s, -1, l, h1) * (pre > 0)
        r = g.sum(2)
        return g.reshape(s, -1, h1).to(out_dtype or w.dtype), r

    # ---------------------------------------------------------------- single-query pool
    def pool_fwd(self, f, pos_out, kt, scale):
        """Softmax-weighted sum over the L cells, one query per head.

        kv = f + pos_out; score[s,b,h,l] = scale * kt[s,h] . kv[s,b,l]; a = softmax_l(score);
        sbar[s,b,h] = sum_l a[s,b,h,l] kv[s,b,l].
        f: (S, B, L, D) compute dtype; pos_out: (L, D); kt: (S, H, D) acc dtype.
        Returns sbar (S, B, H, D) and lse (S, B, H) = logsumexp_l(score), both in the acc dtype.
        (lse lets shards of L be combined exactly, and the backward rebuild a.)"""
        acc = acc_dtype_for(f.dtype)
        kv = f.to(acc) + pos_out.to(acc)
        score = torch.einsum("sbld,shd->sbhl", kv, kt.to(acc)) * scale
        lse = torch.logsumexp(score, dim=-1)
        a = torch.exp(score - lse[..., None])
        sbar = torch.einsum("sbhl,sbld->sbhd", a, kv)
        return sbar, lse

    def pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, *, out_dtype=None):
        """Gradients of pool_fwd: given dsbar (S, B, H, D) returns (df (S, B, L, D) in out_dtype,
        dkt (S, H, D) in the acc dtype, summed over B).

        With c[h,l] = a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
        df_l = sum_h a[h,l] dsbar_h + scale c[h,l] kt_h;   dkt_h = scale sum_{b,l} c[h,l] kv_l."""
        acc = acc_dtype_for(f.dtype)
        kv = f.to(acc) + pos_out.to(acc)
        kt = kt.to(acc)
        score = torch.einsum("sbld,shd->sbhl", kv, kt) * scale
        a = torch.exp(score - lse[..., None])
        dot = torch.einsum("sbld,sbhd->sbhl", kv, dsbar) - (sbar * dsbar).sum(-1)[..., None]
        c = a * dot
        df = torch.einsum("sbhl,sbhd->sbld", a, dsbar) + scale * torch.einsum("sbhl,shd->sbld", c, kt)
        dkt = scale * torch.einsum("sbhl,sbld->shd", c, kv)
        return df.to(out_dtype or f.dtype), dkt

    # ---------------------------------------------------------------- optimizer
    def adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, *, lowp=None):
        """One Adam update (no weight decay) over flat fp32 buffers, in place; capturable.

        params, grads, exp_avg, exp_avg_sq: (S, N) fp32 (or fp64). ``step`` and ``lr`` are
        one-element device tensors (float32) read on the device, never on the host: ``step``
        holds the number of this update (1 for the first), the caller increments it. When
        ``lowp`` ((S, N), e.g. bf16) is given it receives the updated parameters in its dtype
        in the same pass. Matches torch.optim.Adam:
        m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
        t = step.to(params.dtype)
        exp_avg.mul_(beta1).add_(grads, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        # scalar ** tensor: no host-to-device copy of the betas, which CUDA graph capture forbids
        bc1 = 1 - torch.pow(beta1, t)
        bc2 = 1 - torch.pow(beta2, t)
        denom = exp_avg_sq.sqrt() / bc2.sqrt() + eps
        params.sub_(lr.to(params.dtype) / bc1 * exp_avg / denom)
        if lowp is not None:
            lowp.copy_(params)
