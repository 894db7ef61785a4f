"""Weight gradients dW[s] = sum_rows dy[s, row]^T x[s, row] with the bias gradient fused, split-K.

    dW[s, n, k] = sum_{(b, l)} dy[s, (b, l), n] * X[s, (b, l), k]      (fp32 accumulation, fp32 out)
    db[s, n]    = sum_{(b, l)} dy[s, (b, l), n]                          (only with HAS_DB)

The operand X is rebuilt on load (B-operand prologue), so no activation has to exist in memory:

* X = x                              (plain layers; x may be shared by all students: stride 0)
* X = ReLU(p[s, l] + u[s, b])        (first layer's consumer: X2 = 1, a row vector per image)
* X = f[s, b, l] + pos_out[l]        (the pool's key gradient: X2 = 2, a second tile)

Each program owns one (BLOCK_N x BLOCK_K) output tile and reduces over a contiguous range of row
chunks (BLOCK_M rows of one segment each). When the output has fewer tiles than the GPU has SMs the
row range is split SPLIT ways (split-K) and the partial tiles are added with fp32 atomics into a
zeroed output (zeroed by the launcher, or by the tuned configs' pre-hook right before each launch); otherwise each tile is stored once. db is the row sum of the dy tile the GEMM loads
anyway, kept by the programs of the first K tile.

Two kernels compute this: ``wgrad_kernel`` below (pointer loads, any strides and dtypes, all three
X forms) and ``wgrad_tma.wgrad_tma_kernel`` (TMA descriptors, X = x or ReLU(p + u)). A config
(``configs.WgradCfg``) picks the kernel, the output tile, the reduction step and the split; it
comes from the argument, the measured table (``tuned_configs``) or the heuristic ranking
(autotuned when on), as for the GEMMs. The outputs can be given (``out`` / ``out_db``: e.g. views
into a flat gradient buffer, any strides) so the gradient lands in place without a copy.

Where cuBLAS is faster these kernels step aside: on the H100 the sweep measured cuBLAS 1.2x to 4x
faster on every weight-gradient shape of the presets (benchmarks/results/h100/sweep_triton.json,
e.g. fc2's dW at one image: 164 TFLOP/s here, 685 for cuBLAS), because these are reductions over
few rows into many output tiles, where cuBLAS's split/stream-K schedules win. So on a GPU, with
16-bit operands and without an explicit config or split, ``linear_bwd_weight`` and
``first_layer_bwd_weight`` run cuBLAS (``torch.ops.aten.bmm.dtype``: 16-bit products, fp32
output), the first layer's activation materialized a chunk of images at a time by the Triton
kernel of ``gemm.first_layer_act``, and db as an fp32 row sum. ``APM_FAST_WGRAD=triton`` keeps
the Triton kernels (``cublas`` / ``auto``: the default). fp32 mode always runs the Triton kernels.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

import os

from . import _common as _c
from ._common import (INTERPRET, as_rows, cdiv, descriptor, dot_precision, next_pow2, sm_count, tl_dtype, tma_ok,
                      wgrad_share, wgrad_store)
from .configs import WGRAD_INTERP, WgradCfg, rank_wgrad, tuned_entry, wgrad_candidates
from .wgrad_tma import wgrad_tma_kernel

__all__ = ["linear_bwd_weight", "first_layer_bwd_weight", "weight_grad", "choose_split", "WgradCfg"]


@triton.jit
def wgrad_kernel(
    dy_ptr, x_ptr, x2_ptr, dw_ptr, db_ptr,
    S, L, NSEG, N, K,
    sd_s, sd_b, sd_l, sd_n,
    sx_s, sx_b, sx_l, sx_k,
    s2_s, s2_b, s2_l, s2_k,
    sw_s, sw_n, sw_k,
    sdb_s,
    X2: tl.constexpr,        # 0: X = x; 1: X = x + x2[s, b] (row vector); 2: X = x + x2[s, b, l]
    X_RELU: tl.constexpr,
    HAS_DB: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_s = tl.program_id(1).to(tl.int64)
    pid_n, pid_k, tiles_l, c_lo, c_hi = wgrad_share(tl.program_id(0), L, NSEG, N, K, SPLIT, BLOCK_N, BLOCK_K, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    in_n = offs_n < N
    in_k = offs_k < K
    dy_s = dy_ptr + pid_s * sd_s
    x_s = x_ptr + pid_s * sx_s
    x2_s = x2_ptr + pid_s * s2_s
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        seg = (c // tiles_l).to(tl.int64)
        rows = (c % tiles_l) * BLOCK_M + offs_m
        in_m = rows < L
        # dy^T tile (BLOCK_N x BLOCK_M): rows outside the segment load as 0 and add nothing
        d = tl.load(dy_s + seg * sd_b + rows[None, :] * sd_l + offs_n[:, None] * sd_n,
                    mask=in_n[:, None] & in_m[None, :], other=0.0)
        x = tl.load(x_s + seg * sx_b + rows[:, None] * sx_l + offs_k[None, :] * sx_k,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        if X2 == 1:
            v = tl.load(x2_s + seg * s2_b + offs_k * s2_k, mask=in_k, other=0.0)
            x = x.to(tl.float32) + v.to(tl.float32)[None, :]
        if X2 == 2:
            v = tl.load(x2_s + seg * s2_b + rows[:, None] * s2_l + offs_k[None, :] * s2_k,
                        mask=in_m[:, None] & in_k[None, :], other=0.0)
            x = x.to(tl.float32) + v.to(tl.float32)
        if X_RELU:
            x = tl.maximum(x, 0.0)
        acc = tl.dot(d.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PREC)
        if HAS_DB:
            db += tl.sum(d.to(tl.float32), axis=1)

    wgrad_store(dw_ptr + pid_s * sw_s, db_ptr + pid_s * sdb_s, offs_n, offs_k, in_n, in_k, sw_n, sw_k, acc, db, pid_k,
                HAS_DB, SPLIT)


INTERP_TILE = 16


def output_tile(N: int, K: int, elt: int = 2):
    """The interpreter's output tile; 128 x 128 for 16-bit operands (tensor cores) and 64 x 64 for
    fp32 products (FMA units), shrunk to the problem (what choose_split assumes)."""
    if INTERPRET:
        return INTERP_TILE, INTERP_TILE
    cap = 128 if elt <= 2 else 64
    return min(cap, max(16, next_pow2(N))), min(cap, max(16, next_pow2(K)))


def choose_split(S: int, N: int, K: int, rows: int, device, tile=None) -> int:
    """Split the reduction only when the output tiles leave at least half the SMs idle, into as
    many parts as still fit in one wave, keeping >= 256 rows per part. (The interpreter's default;
    on a GPU the ranking weighs several splits per tile, see configs.splits_for.)"""
    bn, bk = tile or output_tile(N, K)
    tiles = S * cdiv(N, bn) * cdiv(K, bk)
    sms = sm_count(device)
    if 2 * tiles > sms:
        return 1
    return max(1, min(sms // tiles, rows // 256))


class _Wgrad:
    """One weight-gradient call, launchable with any eligible config. dy_st / x_st / x2_st:
    (s, b, l, column) strides for the pointer kernel; dy2 / xv: 2-D row views for TMA with row
    offsets (d_rs, d_rb) / (x_rs, x_rb) per student / per segment."""

    def __init__(self, *, dy, dy_st, dy2, d_rs, d_rb, x, x_st, xv, x_rs, x_rb, x2, x2_st, x2_mode, relu, bias,
                 S, L, NSEG, N, K, dot_dtype, prec, out=None, out_db=None):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.elt = max(dy.element_size(), x.element_size())
        device = dy.device
        self.dw = out if out is not None else _c.empty((S, N, K), device=device, dtype=torch.float32)
        self.db = None
        if bias:
            self.db = out_db if out_db is not None else _c.empty((S, N), device=device, dtype=torch.float32)

    def tma_ok(self, cfg: WgradCfg) -> bool:
        return (_c.HAS_TMA and self.x2_mode in (0, 1) and tma_ok(self.dy2) and tma_ok(self.xv)
                and (self.S * self.NSEG == 1 or self.L % cfg.bm == 0))

    def ok(self, cfg: WgradCfg) -> bool:
        return not cfg.tma or self.tma_ok(cfg)

    def tiles_of(self, bn, bk):
        return self.S * cdiv(self.N, bn) * cdiv(self.K, bk)

    def launch(self, cfg: WgradCfg):
        dw, db = self.dw, self.db
        if cfg.split > 1:             # partial tiles are added atomically
            dw.zero_()
            if db is not None:
                db.zero_()
        S, L, NSEG, N, K = self.S, self.L, self.NSEG, self.N, self.K
        x2 = self.x2 if self.x2 is not None else self.x
        db_ = db if db is not None else dw
        sdb = db.stride(0) if db is not None else 0
        meta = dict(X2=self.x2_mode, X_RELU=self.relu, HAS_DB=db is not None, SPLIT=cfg.split,
                    DOT_DTYPE=tl_dtype(self.dot_dtype), PREC=self.prec or dot_precision(self.dot_dtype),
                    BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, BLOCK_M=cfg.bm, num_warps=cfg.warps, num_stages=cfg.stages)
        grid = (cdiv(N, cfg.bn) * cdiv(K, cfg.bk) * cfg.split, S)
        if not cfg.tma:
            wgrad_kernel[grid](self.dy, self.x, x2, dw, db_, S, L, NSEG, N, K, *self.dy_st, *self.x_st,
                               *self.x2_st, dw.stride(0), dw.stride(1), dw.stride(2), sdb, **meta)
            return
        if not self.tma_ok(cfg):
            raise ValueError(f"weight grad: config {cfg.name()} needs TMA-describable dy and x (unit last "
                             f"stride, 16-byte aligned rows) and L % {cfg.bm} == 0 with several segments")
        dy_d = descriptor(self.dy2, (cfg.bm, cfg.bn))
        x_d = descriptor(self.xv, (cfg.bm, cfg.bk))
        s2 = self.x2_st
        wgrad_tma_kernel[grid](dy_d, x_d, x2, dw, db_, S, L, NSEG, N, K, self.d_rs, self.d_rb, self.x_rs, self.x_rb,
                               s2[0], s2[1], s2[3], dw.stride(0), dw.stride(1), dw.stride(2), sdb, **meta)

    def ranked(self):
        sms = sm_count(self.dy.device)
        rows = self.NSEG * self.L
        if INTERPRET:        # small tiles, split as choose_split says; the pointer kernel first
            split = choose_split(self.S, self.N, self.K, rows, self.dy.device, (INTERP_TILE, INTERP_TILE))
            cands = [replace(WGRAD_INTERP, split=split), replace(WGRAD_INTERP, split=split, tma=True)]
            return [c for c in cands if self.ok(c) and (_c.tma_allowed() or not c.tma)]
        tma = _c.tma_allowed() and self.x2_mode in (0, 1) and tma_ok(self.dy2) and tma_ok(self.xv)
        cands = wgrad_candidates(self.elt, tma, tiles_of=self.tiles_of, rows=rows, sms=sms)
        # tiles no wider than the problem (the pool's key gradient has N = heads = 8 rows)
        cn, ck = max(16, next_pow2(self.N)), max(16, next_pow2(self.K))
        cands = list(dict.fromkeys(WgradCfg(min(c.bn, cn), min(c.bk, ck), c.bm, c.warps, c.stages, c.split, c.tma)
                                   for c in cands))
        return [c for c in rank_wgrad(cands, tiles_of=self.tiles_of, rows=rows, sms=sms, elt=self.elt)
                if self.ok(c)]

    def run(self, prim, config, split):
        cfg = self.choose(prim, config, split)
        self.launch(cfg)
        return self.dw, self.db

    def choose(self, prim, config, split):
        if config is not None:
            return config if split is None else replace(config, split=split)
        key = (self.S, self.NSEG, self.L, self.N, self.K)
        entry = tuned_entry(prim, key, WgradCfg, self.elt, self.dy.device) if prim else None
        if entry is not None and self.ok(entry) and (_c.tma_allowed() or not entry.tma):
            cfg = entry
        else:
            ranked = self.ranked()
            cfg = _c.pick((prim, *key, str(self.dot_dtype), self.x2_mode, bool(ranked and ranked[0].tma)),
                          ranked, self.launch, self.dy.device)
        return cfg if split is None else replace(cfg, split=split)


def weight_grad(dy, dy_st, x, x_st, *, S, L, NSEG, N, K, x2=None, x2_st=(0, 0, 0, 0), x2_mode=0,
                relu=False, bias=True, dot_dtype, prec=None, split=None, config=None, out=None, out_db=None,
                dy2=None, d_rows=(0, 0), xv=None, x_rows=(0, 0), prim=None):
    """The generic launcher: strides as (s, b, l, column) quadruples; products in ``dot_dtype``
    (``prec``: Triton's input_precision for fp32 products); dy2 / xv with their (per student, per
    segment) row offsets make the TMA kernel possible; ``prim`` names the shape's entry in the
    tuned table. Returns (dw, db or None)."""
    job = _Wgrad(dy=dy, dy_st=dy_st, dy2=dy2, d_rs=d_rows[0], d_rb=d_rows[1], x=x, x_st=x_st, xv=xv,
                 x_rs=x_rows[0], x_rb=x_rows[1], x2=x2, x2_st=x2_st, x2_mode=x2_mode, relu=relu, bias=bias,
                 S=S, L=L, NSEG=NSEG, N=N, K=K, dot_dtype=dot_dtype, prec=prec, out=out, out_db=out_db)
    return job.run(prim, config, split)


# ------------------------------------------------------------------------------------ cuBLAS route
def use_cublas(dy, x, split, config) -> bool:
    """Whether a weight gradient goes to cuBLAS (see the module's docstring)."""
    route = os.environ.get("APM_FAST_WGRAD", "auto")
    if route not in ("auto", "cublas", "triton"):
        raise ValueError(f"APM_FAST_WGRAD: expected auto, cublas or triton, got {route!r}")
    return (route != "triton" and split is None and config is None and not INTERPRET and dy.is_cuda
            and dy.dtype in (torch.bfloat16, torch.float16) and x.dtype == dy.dtype
            and hasattr(torch.ops.aten.bmm, "dtype"))


def _cublas_into(dy, x, dw, *, accumulate: bool):
    """dw (+)= dy^T x in fp32 from 16-bit dy (S, M, N) and x (S, M, K); dw any strides (PyTorch
    writes a view it cannot hand to cuBLAS through a temporary)."""
    if accumulate:
        dw.add_(torch.ops.aten.bmm.dtype(dy.transpose(1, 2), x, torch.float32))
    else:
        torch.ops.aten.bmm.dtype_out(dy.transpose(1, 2), x, torch.float32, out=dw)


_ONES: dict = {}      # (device, dtype, S, M) -> ones (S, M, 1), made once outside a capture


def _ones(dy):
    """A (S, M, 1) column of ones like dy (S, M, N): the bias gradient as cuBLAS's product
    dy^T 1 instead of torch.sum (on the H200 the head's whole weight gradient at one image went
    from 14.3 to 10.0 us, mlp.2's from 18.1 to 13.9: benchmarks/results/h200/history/48c6bec/suite/
    primitives.json against history/ae446fa/). Kept for later calls unless made while a graph is captured (its
    fill is then part of the graph)."""
    S, M = dy.shape[:2]
    key = (dy.device, dy.dtype, S, M)
    ones = _ONES.get(key)
    if ones is None:
        ones = torch.ones((S, M, 1), device=dy.device, dtype=dy.dtype)
        if not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(dy.device).synchronize()     # filled before any stream reads it
            _ONES[key] = ones
    return ones


def _cublas_outputs(dy, N, K, bias, out, out_db):
    """(dw, db): the given outputs or new ones; db = the fp32 row sums of dy, written here."""
    S = dy.shape[0]
    dw = out if out is not None else _c.empty((S, N, K), device=dy.device, dtype=torch.float32)
    db = None
    if bias:
        db = out_db if out_db is not None else _c.empty((S, N), device=dy.device, dtype=torch.float32)
        torch.ops.aten.bmm.dtype_out(dy.transpose(1, 2), _ones(dy), torch.float32, out=db.unsqueeze(2))
    return dw, db


def _cublas_linear_bwd_weight(dy, x, bias, out, out_db):
    S, M, N = dy.shape
    K = x.shape[-1]
    dw, db = _cublas_outputs(dy, N, K, bias, out, out_db)
    _cublas_into(dy, x if x.dim() == 3 else x.unsqueeze(0).expand(S, M, K), dw, accumulate=False)
    return dw, db


def _cublas_first_layer_bwd_weight(dy, p, u, bias, out, out_db):
    from .gemm import act_chunks

    L, H1 = p.shape[1:]
    dw, db = _cublas_outputs(dy, dy.shape[2], H1, bias, out, out_db)
    for b0, k, a in act_chunks(p, u):
        _cublas_into(dy[:, b0 * L:(b0 + k) * L], a, dw, accumulate=b0 > 0)
    return dw, db


def linear_bwd_weight(dy, x, *, bias=True, split=None, config=None, out=None, out_db=None):
    """dw = sum_m dy[m]^T x[m], db = sum_m dy[m]: dy (S, M, N); x (S, M, K) or shared (M, K).
    ``out`` (S, N, K) / ``out_db`` (S, N) fp32, any strides: written in place and returned."""
    if use_cublas(dy, x, split, config):
        return _cublas_linear_bwd_weight(dy, x, bias, out, out_db)
    S, M, N = dy.shape
    K = x.shape[-1]
    shared = x.dim() == 2
    x_st = (0 if shared else x.stride(0), 0, x.stride(-2), x.stride(-1))
    return weight_grad(dy, (dy.stride(0), 0, dy.stride(1), dy.stride(2)), x, x_st, S=S, L=M, NSEG=1,
                       N=N, K=K, bias=bias, dot_dtype=dy.dtype, split=split, config=config, out=out, out_db=out_db,
                       dy2=as_rows(dy), d_rows=(M, 0), xv=as_rows(x), x_rows=(0 if shared else M, 0),
                       prim="linear_bwd_weight_shared" if shared else "linear_bwd_weight")


def first_layer_bwd_weight(dy, p, u, *, bias=True, split=None, config=None, out=None, out_db=None):
    """linear_bwd_weight with x = ReLU(p[s, l] + u[s, b]) rebuilt tile by tile: dy (S, B*L, N);
    p (S, L, H1); u (S, B, H1). (On the cuBLAS route, materialized a chunk of images at a time.)"""
    if use_cublas(dy, p, split, config):
        return _cublas_first_layer_bwd_weight(dy, p, u, bias, out, out_db)
    S, L, H1 = p.shape
    B = u.shape[1]
    N = dy.shape[2]
    return weight_grad(dy, (dy.stride(0), L * dy.stride(1), dy.stride(1), dy.stride(2)),
                       p, (p.stride(0), 0, p.stride(1), p.stride(2)), S=S, L=L, NSEG=B, N=N, K=H1,
                       x2=u, x2_st=(u.stride(0), u.stride(1), 0, u.stride(2)), x2_mode=1, relu=True,
                       bias=bias, dot_dtype=dy.dtype, split=split, config=config, out=out, out_db=out_db,
                       dy2=as_rows(dy), d_rows=(B * L, L), xv=as_rows(p), x_rows=(L, 0), prim="first_layer_bwd_weight")
