"""The single-query attention pool (spec section 3): forward with an online softmax, and backward.

Forward, per (student s, image b, head h), over the L cells of kv = f + pos_out (added on load,
never stored):   score_l = scale * kt_h . kv_l,  sbar_h = sum_l softmax(score)_l kv_l,
lse_h = logsumexp_l score_l.  One program streams its rows once, keeping the running max, the
running denominator and the weighted sum (width D) in registers. With few (s, b, h) programs (one
image: 8) the rows are split into NSPLIT chunks that write (max, denominator, sum) partials, merged
exactly by a second tiny kernel; with enough programs (B * S * heads >= 2 waves) it is one launch.

Backward, given dsbar (S, B, H, D), per tile of rows (all heads in a loop, so df is written once):
    a = exp(score - lse),  c = a * (kv . dsbar_h - sbar_h . dsbar_h)
    df_l = sum_h a_hl dsbar_h + scale c_hl kt_h
and the key gradient dkt_h = scale sum_{b,l} c_hl kv_l is a weight gradient: the kernel stores
scale * c (S, B*L, H) and the split-K weight-grad kernel reduces it against kv = f + pos_out
rebuilt on load (see wgrad.py).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _common as _c
from ._common import INTERPRET, autotune_enabled, cdiv, config_kwargs, next_pow2, sm_count, tuned
from .wgrad import weight_grad

__all__ = ["pool_fwd", "pool_bwd", "choose_nsplit"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def pool_fwd_kernel(
    f_ptr, pos_ptr, kt_ptr, sbar_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr,
    S, B, H, L, D, CHUNK, NSPLIT, qk_scale,
    sf_s, sf_b, sf_l, sf_d,
    sp_l, sp_d,
    sk_s, sk_h, sk_d,
    FINAL: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)                   # (s, b, h), h fastest: heads of one image share L2
    split = tl.program_id(1)
    h = pid % H
    sb = pid // H
    b = (sb % B).to(tl.int64)
    s = (sb // B).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    # scores in the log2 domain: exp2 is the native instruction
    kt = tl.load(kt_ptr + s * sk_s + h * sk_h + offs_d * sk_d, mask=in_d, other=0.0).to(tl.float32) * qk_scale
    f_base = f_ptr + s * sf_s + b * sf_b
    l_lo = split * CHUNK
    l_hi = tl.minimum(l_lo + CHUNK, L)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for l0 in range(l_lo, l_hi, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        in_r = rows < l_hi
        msk = in_r[:, None] & in_d[None, :]
        kv = tl.load(f_base + rows[:, None] * sf_l + offs_d[None, :] * sf_d, mask=msk, other=0.0).to(tl.float32)
        kv += tl.load(pos_ptr + rows[:, None] * sp_l + offs_d[None, :] * sp_d, mask=msk, other=0.0).to(tl.float32)
        sc = tl.sum(kv * kt[None, :], axis=1)
        sc = tl.where(in_r, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))      # finite: every chunk has >= 1 row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * kv, axis=0)
        m_i = m_new
    if FINAL:
        tl.store(sbar_ptr + pid.to(tl.int64) * D + offs_d, acc / l_i, mask=in_d)
        tl.store(lse_ptr + pid, (m_i + tl.log2(l_i)) * 0.6931471805599453)
    else:
        part = pid.to(tl.int64) * NSPLIT + split
        tl.store(pm_ptr + part, m_i)
        tl.store(pl_ptr + part, l_i)
        tl.store(pacc_ptr + part * D + offs_d, acc, mask=in_d)


@triton.jit
def pool_combine_kernel(pm_ptr, pl_ptr, pacc_ptr, sbar_ptr, lse_ptr, NSPLIT, D,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge NSPLIT (max, denominator, weighted sum) partials of one (s, b, h) exactly."""
    pid = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    in_p = offs_p < NSPLIT
    in_d = offs_d < D
    m = tl.load(pm_ptr + pid * NSPLIT + offs_p, mask=in_p, other=float("-inf"))
    den = tl.load(pl_ptr + pid * NSPLIT + offs_p, mask=in_p, other=0.0)
    acc = tl.load(pacc_ptr + (pid * NSPLIT + offs_p)[:, None] * D + offs_d[None, :],
                  mask=in_p[:, None] & in_d[None, :], other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(in_p, tl.exp2(m - m_all), 0.0)
    den_all = tl.sum(w * den, axis=0)
    tl.store(sbar_ptr + pid * D + offs_d, tl.sum(w[:, None] * acc, axis=0) / den_all, mask=in_d)
    tl.store(lse_ptr + pid, (m_all + tl.log2(den_all)) * 0.6931471805599453)


@triton.jit
def pool_bwd_kernel(
    f_ptr, pos_ptr, kt_ptr, sbar_ptr, lse_ptr, ds_ptr, df_ptr, c_ptr,
    S, B, H, L, D, scale,
    sf_s, sf_b, sf_l, sf_d,
    sp_l, sp_d,
    sk_s, sk_h, sk_d,
    sdf_s, sdf_b, sdf_l, sdf_d,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles = tl.cdiv(L, BLOCK_L)
    lt = pid % tiles
    sb = (pid // tiles).to(tl.int64)             # s * B + b
    b = sb % B
    s = sb // B
    rows = lt * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    in_r = rows < L
    in_d = offs_d < D
    msk = in_r[:, None] & in_d[None, :]
    kv = tl.load(f_ptr + s * sf_s + b * sf_b + rows[:, None] * sf_l + offs_d[None, :] * sf_d,
                 mask=msk, other=0.0).to(tl.float32)
    kv += tl.load(pos_ptr + rows[:, None] * sp_l + offs_d[None, :] * sp_d, mask=msk, other=0.0).to(tl.float32)
    df = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for h in range(H):
        kt = tl.load(kt_ptr + s * sk_s + h * sk_h + offs_d * sk_d, mask=in_d, other=0.0).to(tl.float32)
        vec = (sb * H + h) * D + offs_d               # sbar, dsbar: (S, B, H, D) contiguous
        ds = tl.load(ds_ptr + vec, mask=in_d, other=0.0)
        sbar = tl.load(sbar_ptr + vec, mask=in_d, other=0.0)
        lse = tl.load(lse_ptr + sb * H + h)
        delta = tl.sum(sbar * ds, axis=0)
        a = tl.exp(tl.sum(kv * kt[None, :], axis=1) * scale - lse)
        c = a * (tl.sum(kv * ds[None, :], axis=1) - delta) * scale
        df += a[:, None] * ds[None, :] + c[:, None] * kt[None, :]
        tl.store(c_ptr + (sb * L + rows) * H + h, c, mask=in_r)
    tl.store(df_ptr + s * sdf_s + b * sdf_b + rows[:, None] * sdf_l + offs_d[None, :] * sdf_d,
             df.to(df_ptr.dtype.element_ty), mask=msk)


def _cfg(bl, warps):
    return triton.Config({"BLOCK_L": bl}, num_warps=warps, num_stages=2)


# Rows per step; the whole (padded) width D sits in registers: keep BLOCK_L * BLOCK_D <= 16 K fp32.
FWD_CONFIGS = [_cfg(16, 8), _cfg(8, 4), _cfg(32, 8), _cfg(8, 8)]
BWD_CONFIGS = [_cfg(8, 8), _cfg(16, 8), _cfg(8, 4)]
INTERP_CONFIG = _cfg(8, 4)
_CHUNK_ALIGN = 8 if INTERPRET else 32     # every BLOCK_L candidate divides a chunk


def _rank(configs, args):
    bd = next_pow2(args["D"])
    ok = [c for c in configs if c.kwargs["BLOCK_L"] * bd <= 16384]
    return ok or [min(configs, key=lambda c: c.kwargs["BLOCK_L"])]


pool_fwd_tuned = tuned(pool_fwd_kernel, FWD_CONFIGS, key=["S", "B", "H", "L", "D", "NSPLIT"], rank=_rank)
pool_bwd_tuned = tuned(pool_bwd_kernel, BWD_CONFIGS, key=["S", "B", "H", "L", "D"], rank=_rank)


def choose_nsplit(S: int, B: int, H: int, L: int, device) -> int:
    """Chunks of L per (s, b, h): enough programs for two waves, at least 64 rows per chunk."""
    progs = S * B * H
    return max(1, min(cdiv(2 * sm_count(device), progs), cdiv(L, 64)))


def _run(raw, tuned_fn, grid, args, meta, named):
    if autotune_enabled():
        tuned_fn[grid](*args, **meta)
    else:
        cfg = INTERP_CONFIG if INTERPRET else _rank(tuned_fn.configs, named)[0]
        kw = config_kwargs(cfg)
        raw[grid(kw) if callable(grid) else grid](*args, **meta, **kw)


def pool_fwd(f, pos_out, kt, scale, *, nsplit=None):
    """sbar (S, B, H, D) and lse (S, B, H), fp32: see TorchPrimitives.pool_fwd."""
    S, B, L, D = f.shape
    H = kt.shape[1]
    dev = f.device
    if nsplit is None:
        nsplit = choose_nsplit(S, B, H, L, dev)
    chunk = cdiv(cdiv(L, nsplit), _CHUNK_ALIGN) * _CHUNK_ALIGN
    nsplit = cdiv(L, chunk)                        # no empty chunk
    sbar = _c.empty((S, B, H, D), device=dev, dtype=torch.float32)
    lse = _c.empty((S, B, H), device=dev, dtype=torch.float32)
    progs = S * B * H
    if nsplit > 1:
        pm = _c.empty((progs, nsplit), device=dev, dtype=torch.float32)
        pl = _c.empty(pm.shape, device=dev, dtype=pm.dtype)
        pacc = _c.empty((progs, nsplit, D), device=dev, dtype=torch.float32)
    else:
        pm = pl = pacc = lse
    bd = next_pow2(D)
    args = [f, pos_out, kt, sbar, lse, pm, pl, pacc, S, B, H, L, D, chunk, nsplit, float(scale) * _LOG2E,
            *f.stride(), *pos_out.stride(), *kt.stride()]
    _run(pool_fwd_kernel, pool_fwd_tuned, (progs, nsplit), args, dict(FINAL=nsplit == 1, BLOCK_D=bd),
         {"D": D})
    if nsplit > 1:
        pool_combine_kernel[(progs,)](pm, pl, pacc, sbar, lse, nsplit, D, BLOCK_P=max(2, next_pow2(nsplit)),
                                      BLOCK_D=bd, num_warps=4)
    return sbar, lse


def pool_bwd(f, pos_out, kt, scale, sbar, lse, dsbar, *, out_dtype=None, split=None):
    """(df (S, B, L, D) in out_dtype, dkt (S, H, D) fp32): see TorchPrimitives.pool_bwd."""
    S, B, L, D = f.shape
    H = kt.shape[1]
    dev = f.device
    sbar, lse, dsbar = (t.to(torch.float32).contiguous() for t in (sbar, lse, dsbar))
    df = _c.empty((S, B, L, D), device=dev, dtype=out_dtype or f.dtype)
    c = _c.empty((S, B * L, H), device=dev, dtype=torch.float32)
    args = [f, pos_out, kt, sbar, lse, dsbar, df, c, S, B, H, L, D, float(scale),
            *f.stride(), *pos_out.stride(), *kt.stride(), *df.stride()]

    def grid(m):
        return (S * B * cdiv(L, m["BLOCK_L"]),)

    _run(pool_bwd_kernel, pool_bwd_tuned, grid, args, dict(BLOCK_D=next_pow2(D)), {"D": D})
    # dkt[s, h] = sum_{b,l} c[s, (b,l), h] * (f[s, b, l] + pos_out[l]); fp32 products (tf32 on
    # tensor cores for 16-bit models, true fp32 in fp32 mode)
    dkt, _ = weight_grad(c, (c.stride(0), L * c.stride(1), c.stride(1), c.stride(2)),
                         f, (f.stride(0), f.stride(1), f.stride(2), f.stride(3)), S=S, L=L, NSEG=B, N=H, K=D,
                         x2=pos_out, x2_st=(0, 0, pos_out.stride(0), pos_out.stride(1)), x2_mode=2,
                         bias=False, dot_dtype=torch.float32,
                         prec="ieee" if f.dtype == torch.float32 else "tf32", split=split)
    return df, dkt
