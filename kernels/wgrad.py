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
anyway, kept by the programs of the first K tile. SPLIT and the output tile are chosen on the host
(they decide whether the output must be zeroed); the autotuner only picks the reduction depth
BLOCK_M, warps and stages.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as _c
from ._common import (INTERPRET, autotune_enabled, cdiv, config_kwargs, dot_precision, next_pow2,
                      sm_count, tl_dtype, tuned)

__all__ = ["linear_bwd_weight", "first_layer_bwd_weight", "weight_grad", "choose_split"]


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
    pid = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    num_tiles = num_n * num_k
    # the split index varies slowest: programs running together read the same rows (L2 reuse)
    split = pid // num_tiles
    tile = pid % num_tiles
    pid_n = tile // num_k
    pid_k = tile % num_k
    tiles_l = tl.cdiv(L, BLOCK_M)
    chunks = NSEG * tiles_l
    per = tl.cdiv(chunks, SPLIT)
    c_lo = split * per
    c_hi = tl.minimum(c_lo + per, chunks)

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

    out_mask = in_n[:, None] & in_k[None, :]
    w_ptrs = dw_ptr + pid_s * sw_s + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k
    if SPLIT == 1:
        tl.store(w_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(w_ptrs, acc, mask=out_mask)
    if HAS_DB:
        if pid_k == 0:
            if SPLIT == 1:
                tl.store(db_ptr + pid_s * sdb_s + offs_n, db, mask=in_n)
            else:
                tl.atomic_add(db_ptr + pid_s * sdb_s + offs_n, db, mask=in_n)


def _zero_split_outputs(nargs):
    """Split-K partial tiles are added atomically: zero the outputs before every launch of a tuned
    config (see gemm._zero_r for why a config pre-hook)."""
    if nargs["SPLIT"] > 1:
        nargs["dw_ptr"].zero_()
        if nargs["HAS_DB"]:
            nargs["db_ptr"].zero_()


def _cfg(bm, warps, stages):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages, pre_hook=_zero_split_outputs)


# The reduction depth per iteration; the output tile (BLOCK_N x BLOCK_K, 128 x 128 for every
# preset layer) is fixed on the host.
CONFIGS = [_cfg(64, 8, 3), _cfg(64, 4, 4), _cfg(128, 8, 3), _cfg(32, 4, 4)]
INTERP_CONFIG = _cfg(16, 4, 1)
INTERP_TILE = 16
_SMEM_BUDGET = 200 * 1024


def rank_configs(configs, args):
    """Keep the list order (64-row steps first: 4 stages of 128 x 64 + 64 x 128 bf16 fit easily),
    dropping to the end what would not fit in shared memory (fp32 operands)."""
    elt = args["dy_ptr"].element_size()
    bn, bk = args["BLOCK_N"], args["BLOCK_K"]

    def fits(c):
        bm = c.kwargs["BLOCK_M"]
        return c.num_stages * (bn * bm + bm * bk) * max(elt, args["x_ptr"].element_size()) <= _SMEM_BUDGET

    return [c for c in configs if fits(c)] + [c for c in configs if not fits(c)]


wgrad_tuned = tuned(wgrad_kernel, CONFIGS,
                    key=["S", "L", "NSEG", "N", "K", "X2", "HAS_DB", "SPLIT", "BLOCK_N", "BLOCK_K"],
                    rank=rank_configs)


def output_tile(N: int, K: int, elt: int = 2):
    """128 x 128 for 16-bit operands (tensor cores); 64 x 64 for fp32 products (FMA units)."""
    if INTERPRET:
        return INTERP_TILE, INTERP_TILE
    cap = 128 if elt <= 2 else 64
    return min(cap, max(16, next_pow2(N))), min(cap, max(16, next_pow2(K)))


def choose_split(S: int, N: int, K: int, rows: int, device, tile=None) -> int:
    """Split the reduction only when the output tiles leave at least half the SMs idle, into as
    many parts as still fit in one wave, keeping >= 256 rows per part (fc3's 8 x 16 = 128 tiles at
    one image already fill 132 SMs; the head's 6 x 8 = 48 tiles get 2 parts)."""
    bn, bk = tile or output_tile(N, K)
    tiles = S * cdiv(N, bn) * cdiv(K, bk)
    sms = sm_count(device)
    if 2 * tiles > sms:
        return 1
    return max(1, min(sms // tiles, rows // 256))


def weight_grad(dy, dy_st, x, x_st, *, S, L, NSEG, N, K, x2=None, x2_st=(0, 0, 0, 0), x2_mode=0,
                relu=False, bias=True, dot_dtype, prec=None, split=None, config=None):
    """The generic launcher: strides as (s, b, l, column) quadruples; products in ``dot_dtype``
    (``prec``: Triton's input_precision for fp32 products). Returns (dw, db or None)."""
    device = dy.device
    bn, bk = output_tile(N, K, dot_dtype.itemsize)
    if split is None:
        split = choose_split(S, N, K, NSEG * L, device, (bn, bk))
    tuner = config is None and autotune_enabled()
    alloc = torch.zeros if split > 1 and not tuner else _c.empty   # the tuner's pre-hook zeroes
    dw = alloc((S, N, K), device=device, dtype=torch.float32)
    db = alloc((S, N), device=device, dtype=torch.float32) if bias else None
    args = [dy, x, x2 if x2 is not None else x, dw, db if db is not None else dw,
            S, L, NSEG, N, K, *dy_st, *x_st, *x2_st, dw.stride(0), dw.stride(1), dw.stride(2),
            db.stride(0) if db is not None else 0]
    meta = dict(X2=x2_mode, X_RELU=relu, HAS_DB=bias, SPLIT=split, DOT_DTYPE=tl_dtype(dot_dtype),
                PREC=prec or dot_precision(dot_dtype), BLOCK_N=bn, BLOCK_K=bk)
    grid = (cdiv(N, bn) * cdiv(K, bk) * split, S)
    if tuner:
        wgrad_tuned[grid](*args, **meta)
    else:
        if config is None:
            config = INTERP_CONFIG if INTERPRET else rank_configs(CONFIGS, {
                "dy_ptr": dy, "x_ptr": x, "BLOCK_N": bn, "BLOCK_K": bk})[0]
        wgrad_kernel[grid](*args, **meta, **config_kwargs(config))
    return dw, db


def linear_bwd_weight(dy, x, *, bias=True, split=None, config=None):
    """dw = sum_m dy[m]^T x[m], db = sum_m dy[m]: dy (S, M, N); x (S, M, K) or shared (M, K)."""
    S, M, N = dy.shape
    K = x.shape[-1]
    x_st = (0 if x.dim() == 2 else x.stride(0), 0, x.stride(-2), x.stride(-1))
    return weight_grad(dy, (dy.stride(0), 0, dy.stride(1), dy.stride(2)), x, x_st, S=S, L=M, NSEG=1,
                       N=N, K=K, bias=bias, dot_dtype=dy.dtype, split=split, config=config)


def first_layer_bwd_weight(dy, p, u, *, bias=True, split=None, config=None):
    """linear_bwd_weight with x = ReLU(p[s, l] + u[s, b]) rebuilt tile by tile: dy (S, B*L, N);
    p (S, L, H1); u (S, B, H1)."""
    S, L, H1 = p.shape
    B = u.shape[1]
    N = dy.shape[2]
    return weight_grad(dy, (dy.stride(0), L * dy.stride(1), dy.stride(1), dy.stride(2)),
                       p, (p.stride(0), 0, p.stride(1), p.stride(2)), S=S, L=L, NSEG=B, N=N, K=H1,
                       x2=u, x2_st=(u.stride(0), u.stride(1), 0, u.stride(2)), x2_mode=1, relu=True,
                       bias=bias, dot_dtype=dy.dtype, split=split, config=config)
