"""The pool's per-head products against per-student weights (``Primitives.heads_product``).

With w_h = w[s, h dh : (h + 1) dh, :] (dh x K), a third of the pool's in-projection as the
parameter store holds it (students 3 D^2 apart, rows D apart):

* ``transpose=True``:  out[s, n, h, d] = sum_k w[s, h dh + d, k] x[s, n, h, k]   (w_h x_h);
* ``transpose=False``: out[s, n, h, k] = sum_d x[s, n, h, d] w[s, h dh + d, k]   (x_h w_h).

With one image per student (the TTT step), both are a matrix-vector product per (student, head):
memory-bound, each student's D x D fp32 weights read once. cuBLAS has no batch over two strides
(student, head) of a view, so the plain form (``contract.heads_product``) multiplies each student's
whole third by its heads' vectors (H times the arithmetic) and leaves it to cuBLAS's small-N
kernels: at 64 ``ttt-l14`` students the w_h x_h form ran at 0.30 ms a call, about 0.5 TB/s
(``gemmSN_NN``, 2 calls a step) and x_h w_h at 0.10 ms (``gemmSN_TN``), against 0.036 ms to read
the 151 MB once (``benchmarks/results/h200/4ba7553-profiles/engine.json``, ``profile/triton/S=64``).

Here each program reads its own tile of one student's weights once, in its dtype, and forms every
image's products from it (images past the first reread the tile from the cache):

* w_h x_h: a program per (block of BR rows, student); the rows' heads pick x's entries; sums over
  K in chunks of BK, in w's dtype (fp32 or fp64), in a fixed order (deterministic);
* x_h w_h: a program per (block of BK columns, head, student), sums over the head's dh rows in
  chunks of BD.

The Triton table runs them with several students (one student keeps the plain form's product per
head, cuBLAS's gemv), up to MAX_IMAGES images a student (the step has one; more make a real
product, cuBLAS's). Not
autotuned: the blocks are picked so that the grid covers the GPU twice over where it can, and a
program's tile (TILE elements) spans whole rows (or a whole head) where that leaves one round of
loads: at one student, 192 programs of 4 rows x 768 (w_h x_h) or 96 rows x 32 columns (x_h w_h).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, next_pow2, sm_count

__all__ = ["heads_product", "MAX_IMAGES"]

MAX_IMAGES = 8            # images a student up to which the matrix-vector kernels run
WARPS = 4
TILE = 4096               # elements of w a program loads at once (32 a thread): few programs (one
                          # student) take their whole rows or heads in one round of loads


@triton.jit
def heads_wx_kernel(x_ptr, w_ptr, out_ptr, N, R, K, DH,
                    sxs, sxn, sxh, sxk, sws, swr, swk, sos, son, soh, sod,
                    BR: tl.constexpr, BK: tl.constexpr):
    # program: BR rows of one student's w (their heads: r // DH), against every image's x
    s = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < R
    h = r // DH
    kk = tl.arange(0, BK)
    w_rows = w_ptr + s * sws + r[:, None].to(tl.int64) * swr
    for n in range(N):
        x_rows = x_ptr + s * sxs + n * sxn + h[:, None].to(tl.int64) * sxh
        acc = tl.zeros([BR], dtype=w_ptr.dtype.element_ty)
        for k0 in range(0, K, BK):
            k = k0 + kk
            m = rm[:, None] & (k < K)[None, :]
            wt = tl.load(w_rows + k[None, :] * swk, mask=m, other=0.0)
            xt = tl.load(x_rows + k[None, :] * sxk, mask=m, other=0.0)
            acc += tl.sum(wt * xt, axis=1)
        tl.store(out_ptr + s * sos + n * son + h.to(tl.int64) * soh + (r % DH) * sod,
                 acc.to(out_ptr.dtype.element_ty), mask=rm)


@triton.jit
def heads_xw_kernel(x_ptr, w_ptr, out_ptr, N, K, DH,
                    sxs, sxn, sxh, sxd, sws, swr, swk, sos, son, soh, sok,
                    BD: tl.constexpr, BK: tl.constexpr):
    # program: BK columns of head h's dh rows of one student's w, against every image's x[.., h, :]
    kb = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    k = kb * BK + tl.arange(0, BK)
    km = k < K
    dd = tl.arange(0, BD)
    w_head = w_ptr + s * sws + (h * DH).to(tl.int64) * swr
    for n in range(N):
        x_head = x_ptr + s * sxs + n * sxn + h * sxh
        acc = tl.zeros([BK], dtype=w_ptr.dtype.element_ty)
        for d0 in range(0, DH, BD):
            d = d0 + dd
            dm = d < DH
            wt = tl.load(w_head + d[:, None].to(tl.int64) * swr + k[None, :] * swk,
                         mask=dm[:, None] & km[None, :], other=0.0)
            xv = tl.load(x_head + d * sxd, mask=dm, other=0.0)
            acc += tl.sum(wt * xv[:, None], axis=0)
        tl.store(out_ptr + s * sos + n * son + h * soh + k * sok, acc.to(out_ptr.dtype.element_ty), mask=km)


def _block(programs_at, sizes, want):
    """The largest of ``sizes`` whose grid (``programs_at(size)``) has at least ``want`` programs,
    else the smallest."""
    for b in sizes:
        if programs_at(b) >= want:
            return b
    return sizes[-1]


def heads_product(x, w, transpose=False):
    """See ``Primitives.heads_product``: x (S, N, H, dh or K), w (S, H dh, K), one dtype (fp32 or
    fp64), N <= MAX_IMAGES; any strides. Returns a new (S, N, H, K or dh) tensor in that dtype."""
    from apm_fast.ops.contract import empty

    s, n, h, _ = x.shape
    r, k = w.shape[1], w.shape[2]
    dh = r // h
    want = 2 * sm_count(x.device)
    if transpose:
        out = empty((s, n, h, dh), dtype=x.dtype, device=x.device)
        br = 4 if INTERPRET else _block(lambda b: s * cdiv(r, b), (32, 16, 8, 4), want)
        bk = 16 if INTERPRET else min(next_pow2(k), TILE // br)
        heads_wx_kernel[(cdiv(r, br), s)](x, w, out, n, r, k, dh, *x.stride(), *w.stride(), *out.stride(),
                                          BR=br, BK=bk, num_warps=WARPS)
        return out
    out = empty((s, n, h, k), dtype=x.dtype, device=x.device)
    bk = 16 if INTERPRET else _block(lambda b: s * h * cdiv(k, b), (128, 64, 32), want)
    bd = 8 if INTERPRET else min(next_pow2(dh), TILE // bk)
    heads_xw_kernel[(cdiv(k, bk), h, s)](x, w, out, n, k, dh, *x.stride(), *w.stride(), *out.stride(),
                                         BD=bd, BK=bk, num_warps=WARPS)
    return out
