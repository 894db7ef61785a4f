"""The weight-gradient kernel of ``wgrad.py`` with dy and X loaded through TMA descriptors.

    dW[s, n, k] = sum_rows dy[s, row, n] * X[s, row, k],   db[s, n] = sum_rows dy[s, row, n]

dy and X are 2-D row views (rows ``s * rs + seg * rb + l``); X is x as stored (X2 = 0) or
ReLU(p[s, l] + u[s, b]) (X2 = 1: the first layer's activation rebuilt on load, through
registers). The dy tile (BLOCK_M x BLOCK_N) is used transposed straight from shared memory as
wgmma's A operand. A chunk of BLOCK_M rows never crosses a segment: the launcher uses this kernel
only when L % BLOCK_M == 0 or there is a single segment (whose tail rows TMA fills with zeros,
so they add nothing). Split-K and the output are as in ``wgrad.wgrad_kernel``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import wgrad_share, wgrad_store

__all__ = ["wgrad_tma_kernel"]


@triton.jit
def wgrad_tma_kernel(
    dy_desc, x_desc, x2_ptr, dw_ptr, db_ptr,
    S, L, NSEG, N, K,
    d_rs, d_rb, x_rs, x_rb,
    s2_s, s2_b, s2_k,
    sw_s, sw_n, sw_k,
    sdb_s,
    X2: tl.constexpr,        # 0: X = x; 1: X = x + x2[s, b] (row vector per segment)
    X_RELU: tl.constexpr,
    HAS_DB: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    s = tl.program_id(1)
    pid_n, pid_k, tiles_l, c_lo, c_hi = wgrad_share(tl.program_id(0), L, NSEG, N, K, SPLIT, BLOCK_N, BLOCK_K, BLOCK_M)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    in_n = offs_n < N
    in_k = offs_k < K
    s64 = s.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        seg = c // tiles_l
        l0 = (c % tiles_l) * BLOCK_M
        d = dy_desc.load([s * d_rs + seg * d_rb + l0, n0])
        x = x_desc.load([s * x_rs + seg * x_rb + l0, k0])
        if X2 == 1:
            v = tl.load(x2_ptr + s64 * s2_s + seg.to(tl.int64) * s2_b + offs_k * s2_k, mask=in_k, other=0.0)
            x = x.to(tl.float32) + v.to(tl.float32)[None, :]
        if X_RELU:
            x = tl.maximum(x, 0.0)
        acc = tl.dot(d.to(DOT_DTYPE).T, x.to(DOT_DTYPE), acc, input_precision=PREC)
        if HAS_DB:
            db += tl.sum(d.to(tl.float32), axis=0)

    wgrad_store(dw_ptr + s64 * sw_s, db_ptr + s64 * sdb_s, offs_n, offs_k, in_n, in_k, sw_n, sw_k, acc, db, pid_k,
                HAS_DB, SPLIT)
