"""Row-tiled GEMM with fused prologue/epilogue: the forward layers and the input gradients.

    C[s, (b, l), n] = epilogue( prologue(A)[s, (b, l), :] @ B[s, :, n] )

One kernel serves four primitives (constexpr flags pick the variant at compile time):

=======================  ==========================  ======  =====================================
primitive                A (prologue)                B       epilogue
=======================  ==========================  ======  =====================================
linear                   x                           w^T     + bias, ReLU, cast
first_layer_linear       ReLU(p[s,l] + u[s,b]) (fp32  w^T     + bias, ReLU, cast
                         add, cast to the dot dtype)
linear_bwd_input         dy                          w       * (stored input > 0), cast
first_layer_bwd_input    dy                          w       * (p[s,l] + u[s,b] > 0), cast, and
                                                             r[s,b] += column sums (atomics)
=======================  ==========================  ======  =====================================

Rows are addressed as (segment b, position l) with their own strides, and a tile never straddles
two segments (``TL = cdiv(L, BLOCK_M)`` tiles per segment): so the per-image vectors u_b and r_b
are one row vector per tile, and ReLU(P + u) is never materialized. A plain (S, M, K) operand is
one segment of L = M rows. The student dim S is grid axis 1 (its offset in int64: S * M * K can
pass 2**31). Out-of-range rows/columns are masked (odd L and widths).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as _c
from ._common import (INTERPRET, autotune_enabled, cdiv, config_kwargs, dot_precision, sm_count,
                      tl_dtype, tuned)

__all__ = ["linear", "first_layer_linear", "linear_bwd_input", "first_layer_bwd_input"]


@triton.jit
def gemm_kernel(
    a_ptr, u_ptr, b_ptr, bias_ptr, m_ptr, y_ptr, r_ptr,
    S, L, NSEG, N, K,
    sa_s, sa_b, sa_l, sa_k,
    su_s, su_b, su_x,
    sb_s, sb_k, sb_n,
    sbias_s,
    sm_s, sm_b, sm_l, sm_n,
    sy_s, sy_b, sy_l, sy_n,
    sr_s, sr_b,
    PROLOGUE: tl.constexpr,   # 0: A as stored; 1: A = ReLU(a + u[seg]) (first layer)
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    EPI_MASK: tl.constexpr,   # 0: none; 1: C *= (m > 0); 2: C *= (m + u[seg] > 0), r[seg] += sum_l C
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    tiles_l = tl.cdiv(L, BLOCK_M)
    num_m = NSEG * tiles_l
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row tiles share the B column tiles while they sit in L2
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    seg = (pid_m // tiles_l).to(tl.int64)
    offs_l = (pid_m % tiles_l) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_l = offs_l < L
    in_n = offs_n < N

    a_ptrs = a_ptr + pid_s * sa_s + seg * sa_b + offs_l[:, None] * sa_l + offs_k[None, :] * sa_k
    b_ptrs = b_ptr + pid_s * sb_s + offs_k[:, None] * sb_k + offs_n[None, :] * sb_n
    u_row = u_ptr + pid_s * su_s + seg * su_b
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=in_l[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=in_n[None, :], other=0.0)
        else:
            in_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=in_l[:, None] & in_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if PROLOGUE == 1:
            if EVEN_K:
                u = tl.load(u_row + (k0 + offs_k) * su_x)
            else:
                u = tl.load(u_row + (k0 + offs_k) * su_x, mask=offs_k < K - k0, other=0.0)
            # the first layer's activation, made here and never written: ReLU(P_l + u_b)
            a = tl.maximum(a.to(tl.float32) + u.to(tl.float32)[None, :], 0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PREC)
        a_ptrs += BLOCK_K * sa_k
        b_ptrs += BLOCK_K * sb_k

    if HAS_BIAS:
        bias = tl.load(bias_ptr + pid_s * sbias_s + offs_n, mask=in_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tile_mask = in_l[:, None] & in_n[None, :]
    if EPI_MASK != 0:
        m = tl.load(m_ptr + pid_s * sm_s + seg * sm_b + offs_l[:, None] * sm_l + offs_n[None, :] * sm_n,
                    mask=tile_mask, other=0.0).to(tl.float32)
        if EPI_MASK == 2:
            u = tl.load(u_row + offs_n * su_x, mask=in_n, other=0.0)
            m = m + u.to(tl.float32)[None, :]
        # (rows and columns outside the problem hold 0 already: their A rows / B columns load as 0)
        acc = tl.where(m > 0, acc, 0.0)
        if EPI_MASK == 2:
            # r[s, b] = sum over the image's L rows; each row tile adds its part
            tl.atomic_add(r_ptr + pid_s * sr_s + seg * sr_b + offs_n, tl.sum(acc, axis=0), mask=in_n)
    y_ptrs = y_ptr + pid_s * sy_s + seg * sy_b + offs_l[:, None] * sy_l + offs_n[None, :] * sy_n
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


def _zero_r(nargs):
    """Before every launch of a tuned config (benchmark runs and the real one): the r atomics need
    a zeroed target. A config pre-hook, because it runs before each of those launches in every
    Triton version (unlike the autotuner's own reset after benchmarking)."""
    if nargs["EPI_MASK"] == 2:
        nargs["r_ptr"].zero_()


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages, pre_hook=_zero_r)


# Candidates for the presets (L = 1024; widths 1024 -> 4096 -> 2048 -> 1024 -> 512..1024) at
# B = 1, 8, 64 and S = 1, 8: 128x256 for the big batched GEMMs, 128x128 when one image fills
# ~one wave (fc2 at B = 1: 8 x 16 = 128 tiles on 132 SMs), 64-wide tiles for fc3/head at B = 1.
CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]
# Interpreter: small blocks so tests with widths of a few tens still cross tile borders.
INTERP_CONFIG = _cfg(16, 16, 16, 4, 1, group=2)
_SMEM_BUDGET = 200 * 1024


def rank_configs(configs, args):
    """Best first: fill the SMs in whole waves, then prefer larger tiles (more reuse per load);
    configs whose pipeline would not fit in shared memory (or, for fp32, whose tile is too large
    for the FMA path's registers) go last."""
    sms = sm_count(args["y_ptr"].device)
    tiles_base = args["S"] * args["NSEG"]
    elt = args["b_ptr"].element_size()

    def score(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if c.num_stages * (bm * bk + bk * bn) * elt > _SMEM_BUDGET:
            return -1.0
        if elt == 4 and bm * bn > 128 * 64:
            return -0.5     # fp32 "ieee" products run on the FMA units: keep the tile's registers small
        tiles = tiles_base * cdiv(args["L"], bm) * cdiv(args["N"], bn)
        wave_eff = tiles / (cdiv(tiles, sms) * sms)
        reuse = (bm * bn / (bm + bn)) / (128 * 256 / 384)
        return wave_eff * reuse ** 0.5

    return sorted(configs, key=score, reverse=True)


gemm_tuned = tuned(gemm_kernel, CONFIGS, key=["S", "L", "NSEG", "N", "K", "PROLOGUE", "EPI_MASK"],
                   rank=rank_configs)


def use_tuner(config) -> bool:
    return config is None and autotune_enabled()


def _launch(a, a_st, u, u_st, b, b_st, bias, mask, m_st, y, y_st, r, r_st, *, S, L, NSEG, N, K,
            prologue, relu, epi_mask, dot_dtype, config=None):
    dummy = y
    args = [a, u if u is not None else dummy, b, bias if bias is not None else dummy,
            mask if mask is not None else dummy, y, r if r is not None else dummy,
            S, L, NSEG, N, K, *a_st, *u_st, *b_st, (bias.stride(0) if bias is not None else 0),
            *m_st, *y_st, *r_st]
    meta = dict(PROLOGUE=prologue, HAS_BIAS=bias is not None, RELU=relu, EPI_MASK=epi_mask,
                DOT_DTYPE=tl_dtype(dot_dtype), PREC=dot_precision(dot_dtype))

    def grid(m):
        return (NSEG * cdiv(L, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), S)

    if use_tuner(config):
        # EVEN_K depends on BLOCK_K, which is 64 in every GPU candidate
        gemm_tuned[grid](*args, **meta, EVEN_K=K % 64 == 0)
        return
    if config is None:
        named = {"S": S, "L": L, "NSEG": NSEG, "N": N, "b_ptr": b, "y_ptr": y}
        config = INTERP_CONFIG if INTERPRET else rank_configs(CONFIGS, named)[0]
    kw = config_kwargs(config)
    gemm_kernel[grid(kw)](*args, **meta, EVEN_K=K % kw["BLOCK_K"] == 0, **kw)


def _rows(t, nseg):
    """(s, b, l) strides of an (S, nseg * L, X) tensor seen as nseg segments of L rows."""
    L = t.shape[1] // nseg
    return (t.stride(0), L * t.stride(1), t.stride(1))


# ------------------------------------------------------------------------------------ launchers
# Shapes are checked by the caller (apm_fast.backends.triton_backend); these assume them.

def linear(x, w, b=None, *, relu=False, out_dtype=None, config=None):
    """y = x w^T (+ b) (ReLU): x (S, M, K) or shared (M, K); w (S, N, K); b (S, N)."""
    S, N, K = w.shape
    shared = x.dim() == 2
    M = x.shape[-2]
    y = _c.empty((S, M, N), device=w.device, dtype=out_dtype or w.dtype)
    a_st = (0 if shared else x.stride(0), 0, x.stride(-2), x.stride(-1))
    _launch(x, a_st, None, (0, 0, 0), w, (w.stride(0), w.stride(2), w.stride(1)), b, None,
            (0, 0, 0, 0), y, (y.stride(0), 0, y.stride(1), y.stride(2)), None, (0, 0),
            S=S, L=M, NSEG=1, N=N, K=K, prologue=0, relu=relu, epi_mask=0, dot_dtype=w.dtype,
            config=config)
    return y


def first_layer_linear(p, u, w, b, *, relu=True, out_dtype=None, config=None):
    """y[s, b*L + l] = ReLU(p[s, l] + u[s, b]) w^T + bias (ReLU): p (S, L, H1); u (S, B, H1);
    w (S, N, H1); b (S, N). The activation only ever exists tile by tile, in registers."""
    S, L, H1 = p.shape
    B = u.shape[1]
    N = w.shape[1]
    y = _c.empty((S, B * L, N), device=w.device, dtype=out_dtype or w.dtype)
    _launch(p, (p.stride(0), 0, p.stride(1), p.stride(2)), u, (u.stride(0), u.stride(1), u.stride(2)),
            w, (w.stride(0), w.stride(2), w.stride(1)), b, None, (0, 0, 0, 0),
            y, (*_rows(y, B), y.stride(2)), None, (0, 0),
            S=S, L=L, NSEG=B, N=N, K=H1, prologue=1, relu=relu, epi_mask=0, dot_dtype=w.dtype,
            config=config)
    return y


def linear_bwd_input(dy, w, *, mask=None, out_dtype=None, config=None):
    """dx = dy w (* (mask > 0)): dy (S, M, N); w (S, N, K); mask (S, M, K) or None."""
    S, M, N = dy.shape
    K = w.shape[2]
    dx = _c.empty((S, M, K), device=w.device, dtype=out_dtype or w.dtype)
    m_st = (mask.stride(0), 0, mask.stride(1), mask.stride(2)) if mask is not None else (0, 0, 0, 0)
    _launch(dy, (dy.stride(0), 0, dy.stride(1), dy.stride(2)), None, (0, 0, 0),
            w, (w.stride(0), w.stride(1), w.stride(2)), None, mask, m_st,
            dx, (dx.stride(0), 0, dx.stride(1), dx.stride(2)), None, (0, 0),
            S=S, L=M, NSEG=1, N=K, K=N, prologue=0, relu=False,
            epi_mask=1 if mask is not None else 0, dot_dtype=w.dtype, config=config)
    return dx


def first_layer_bwd_input(dy, w, p, u, *, out_dtype=None, config=None):
    """g1 = (dy w) * (p[l] + u[b] > 0) (S, B*L, H1) and r = sum_l g1 (S, B, H1) in fp32."""
    S, L, H1 = p.shape
    B = u.shape[1]
    N = w.shape[1]
    g1 = _c.empty((S, B * L, H1), device=w.device, dtype=out_dtype or w.dtype)
    # atomics add into r: zeroed here, or by the tuned configs' pre-hook just before the launch
    r = (_c.empty if use_tuner(config) else torch.zeros)((S, B, H1), device=w.device, dtype=torch.float32)
    _launch(dy, (*_rows(dy, B), dy.stride(2)), u, (u.stride(0), u.stride(1), u.stride(2)),
            w, (w.stride(0), w.stride(1), w.stride(2)), None, p, (p.stride(0), 0, p.stride(1), p.stride(2)),
            g1, (*_rows(g1, B), g1.stride(2)), r, (r.stride(0), r.stride(1)),
            S=S, L=L, NSEG=B, N=H1, K=N, prologue=0, relu=False, epi_mask=2, dot_dtype=w.dtype,
            config=config)
    return g1, r
