"""The single-query attention pool (spec section 3): forward and backward, every head at once on
tensor cores.

Forward, per (student s, image b) and tile of BLOCK_L rows, over kv = f + pos_out (added on load
in fp32, never stored): score_hl = scale * kt_h . kv_l for every head h at once (one product of
the (rows x D) kv tile with the (D x heads) keys, D in slices of BLOCK_K), the tile's softmax
statistics per head, then sum_l p_hl kv_l (a second product, the same kv slices read again, from
cache). f is read once for all heads. A problem of one tile writes sbar and lse; otherwise every
tile writes its (max, denominator, weighted sum) partials and a second small kernel merges them
exactly, each (s, b, h) row cut into column slices where the rows alone would leave most SMs idle
(:func:`combine_slices`).

Backward, per tile of rows, every head at once: with a = exp(score - lse) and
c = a * (kv . dsbar_h - sbar_h . dsbar_h) * scale (both (rows x heads), from two products of the
kv tile with the keys and with dsbar),
    df = a dsbar + c kt
(two products of the (rows x heads) tiles with the (heads x D) slices). The key gradient
dkt_h = sum_{b,l} c_hl kv_l is a weight gradient: the kernel stores c (S, B*L, H) and the split-K
weight-grad kernel reduces it against kv = f + pos_out rebuilt on load (see wgrad.py).

The products run in fp32 ("ieee") for fp32 f and in tf32 on the tensor cores for 16-bit f (as
the key gradient's): kv, the keys and the softmax weights enter them with 10 mantissa bits, more
than the bf16 f carries. The heads are padded to 16 (a product's least width).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _common as _c
from ._common import INTERPRET, autotune_enabled, cdiv, config_kwargs, next_pow2, sm_count, tuned
from .wgrad import weight_grad

__all__ = ["pool_fwd", "pool_bwd", "choose_block_l", "combine_slices"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _kv_tile(f_base, pos_ptr, rows, cols, msk, sf_l, sf_d, sp_l, sp_d):
    """kv = f + pos_out over (rows, cols), in fp32 (0 outside ``msk``)."""
    kv = tl.load(f_base + rows[:, None] * sf_l + cols[None, :] * sf_d, mask=msk, other=0.0).to(tl.float32)
    return kv + tl.load(pos_ptr + rows[:, None] * sp_l + cols[None, :] * sp_d, mask=msk, other=0.0).to(tl.float32)


@triton.jit
def pool_fwd_kernel(
    f_ptr, pos_ptr, kt_ptr, sbar_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr,
    S, B, H, L, D, NSPLIT, qk_scale,
    sf_s, sf_b, sf_l, sf_d,
    sp_l, sp_d,
    sk_s, sk_h, sk_d,
    FINAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    sb = tl.program_id(0)                      # s * B + b
    split = tl.program_id(1)                   # the tile of rows
    b = (sb % B).to(tl.int64)
    s = (sb // B).to(tl.int64)
    rows = split * BLOCK_L + tl.arange(0, BLOCK_L)
    in_r = rows < L
    heads = tl.arange(0, BLOCK_H)
    in_h = heads < H
    f_base = f_ptr + s * sf_s + b * sf_b
    k_base = kt_ptr + s * sk_s
    sc = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + tl.arange(0, BLOCK_K)
        in_d = cols < D
        kv = _kv_tile(f_base, pos_ptr, rows, cols, in_r[:, None] & in_d[None, :], sf_l, sf_d, sp_l, sp_d)
        kt = tl.load(k_base + heads[None, :] * sk_h + cols[:, None] * sk_d, mask=in_d[:, None] & in_h[None, :],
                     other=0.0).to(tl.float32)                                   # (BLOCK_K, heads)
        sc = tl.dot(kv, kt, sc, input_precision=PREC)
    # scores in the log2 domain (exp2 is the native instruction); rows past L weigh nothing
    sc = tl.where(in_r[:, None], sc * qk_scale, float("-inf"))
    m = tl.max(sc, axis=0)                                    # finite: a tile has >= 1 row
    p = tl.exp2(sc - m[None, :])
    den = tl.sum(p, axis=0)
    pt = tl.trans(p)                                          # (heads, rows)
    vec = (sb.to(tl.int64) * H + heads) * D                   # rows of (S, B, H, D)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + tl.arange(0, BLOCK_K)
        in_d = cols < D
        kv = _kv_tile(f_base, pos_ptr, rows, cols, in_r[:, None] & in_d[None, :], sf_l, sf_d, sp_l, sp_d)
        acc = tl.dot(pt, kv, input_precision=PREC)            # (heads, BLOCK_K)
        out = in_h[:, None] & in_d[None, :]
        if FINAL:
            tl.store(sbar_ptr + vec[:, None] + cols[None, :], acc / den[:, None], mask=out)
        else:
            tl.store(pacc_ptr + (vec * NSPLIT + split * D)[:, None] + cols[None, :], acc, mask=out)
    hp = sb.to(tl.int64) * H + heads
    if FINAL:
        tl.store(lse_ptr + hp, (m + tl.log2(den)) * 0.6931471805599453, mask=in_h)
    else:
        tl.store(pm_ptr + hp * NSPLIT + split, m, mask=in_h)
        tl.store(pl_ptr + hp * NSPLIT + split, den, mask=in_h)


@triton.jit
def pool_combine_kernel(pm_ptr, pl_ptr, pacc_ptr, sbar_ptr, lse_ptr, NSPLIT, D, D_CHUNK,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge NSPLIT (max, denominator, weighted sum) partials of one (s, b, h) exactly: program
    (pid, part) writes columns [part D_CHUNK, (part + 1) D_CHUNK) of its sbar row, in slices of
    BLOCK_D (D_CHUNK a multiple of BLOCK_D, or all of D), and part 0 the lse."""
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    in_p = offs_p < NSPLIT
    m = tl.load(pm_ptr + pid * NSPLIT + offs_p, mask=in_p, other=float("-inf"))
    den = tl.load(pl_ptr + pid * NSPLIT + offs_p, mask=in_p, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(in_p, tl.exp2(m - m_all), 0.0)
    den_all = tl.sum(w * den, axis=0)
    w = w / den_all
    for d0 in range(0, D_CHUNK, BLOCK_D):
        offs_d = part * D_CHUNK + d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        acc = tl.load(pacc_ptr + (pid * NSPLIT + offs_p)[:, None] * D + offs_d[None, :],
                      mask=in_p[:, None] & in_d[None, :], other=0.0)
        tl.store(sbar_ptr + pid * D + offs_d, tl.sum(w[:, None] * acc, axis=0), mask=in_d)
    tl.store(lse_ptr + pid, (m_all + tl.log2(den_all)) * 0.6931471805599453, mask=part == 0)


@triton.jit
def pool_bwd_kernel(
    f_ptr, pos_ptr, kt_ptr, sbar_ptr, lse_ptr, ds_ptr, df_ptr, c_ptr,
    S, B, H, L, D, scale,
    sf_s, sf_b, sf_l, sf_d,
    sp_l, sp_d,
    sk_s, sk_h, sk_d,
    sdf_s, sdf_b, sdf_l, sdf_d,
    PREC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles = tl.cdiv(L, BLOCK_L)
    lt = pid % tiles
    sb = (pid // tiles).to(tl.int64)             # s * B + b
    b = sb % B
    s = sb // B
    rows = lt * BLOCK_L + tl.arange(0, BLOCK_L)
    in_r = rows < L
    heads = tl.arange(0, BLOCK_H)
    in_h = heads < H
    f_base = f_ptr + s * sf_s + b * sf_b
    k_base = kt_ptr + s * sk_s
    vec = (sb * H + heads) * D                   # sbar, dsbar: (S, B, H, D) contiguous
    sc = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    kd = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
    delta = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + tl.arange(0, BLOCK_K)
        in_d = cols < D
        kv = _kv_tile(f_base, pos_ptr, rows, cols, in_r[:, None] & in_d[None, :], sf_l, sf_d, sp_l, sp_d)
        hd = in_d[:, None] & in_h[None, :]                    # (BLOCK_K, heads) slices
        kt = tl.load(k_base + heads[None, :] * sk_h + cols[:, None] * sk_d, mask=hd, other=0.0).to(tl.float32)
        ds = tl.load(ds_ptr + vec[None, :] + cols[:, None], mask=hd, other=0.0)
        sbar = tl.load(sbar_ptr + vec[None, :] + cols[:, None], mask=hd, other=0.0)
        sc = tl.dot(kv, kt, sc, input_precision=PREC)
        kd = tl.dot(kv, ds, kd, input_precision=PREC)
        delta += tl.sum(sbar * ds, axis=0)
    lse = tl.load(lse_ptr + sb * H + heads, mask=in_h, other=0.0)
    live = in_r[:, None] & in_h[None, :]
    a = tl.where(live, tl.exp(sc * scale - lse[None, :]), 0.0)
    c = a * (kd - delta[None, :]) * scale
    tl.store(c_ptr + (sb * L + rows)[:, None] * H + heads[None, :], c, mask=live)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + tl.arange(0, BLOCK_K)
        in_d = cols < D
        hd = in_h[:, None] & in_d[None, :]                    # (heads, BLOCK_K) slices
        ds = tl.load(ds_ptr + vec[:, None] + cols[None, :], mask=hd, other=0.0)
        kt = tl.load(k_base + heads[:, None] * sk_h + cols[None, :] * sk_d, mask=hd, other=0.0).to(tl.float32)
        df = tl.dot(c, kt, tl.dot(a, ds, input_precision=PREC), input_precision=PREC)
        tl.store(df_ptr + s * sdf_s + b * sdf_b + rows[:, None] * sdf_l + cols[None, :] * sdf_d,
                 df.to(df_ptr.dtype.element_ty), mask=in_r[:, None] & in_d[None, :])


def _cfg(bk, warps=4):
    return triton.Config({"BLOCK_K": bk}, num_warps=warps, num_stages=2)


# The slice of D per product (4 warps: 8 were slower at every shape measured). The rows per program
# (BLOCK_L) are chosen by choose_block_l; the ranking puts first, for those rows, the slices measured
# fastest on the H200 at ttt-l14's shapes (each kernel 20 times in a CUDA graph; tf32 products):
# 16 rows (one image): forward 17.6 us with 128 (16.7 with 256), backward 25.7 with 128; 64 rows
# (64 students): forward 101 us with 128, backward 202 with 32 and 204 with 64
# (``benchmarks/results/h200/pool-heads-at-once/pool_cfg.jsonl``).
FWD_CONFIGS = [_cfg(128), _cfg(256), _cfg(64), _cfg(32)]
BWD_CONFIGS = [_cfg(128), _cfg(64), _cfg(32), _cfg(256)]
INTERP_CONFIG = _cfg(16)
_PREFER = {"fwd": {16: (128, 256, 64), 32: (128, 64, 256), 64: (128, 64, 32)},
           "bwd": {16: (128, 64, 256), 32: (64, 128, 32), 64: (64, 32, 128)}}


def _ranker(kind):
    def rank(configs, args):
        """Slices no wider than D needs (at least 16), the preferred ones for BLOCK_L first."""
        cap = max(16, next_pow2(args["D"]))
        prefer = _PREFER[kind].get(args.get("BLOCK_L"), ())
        ok = [c for c in configs if c.kwargs["BLOCK_K"] <= cap]
        ok.sort(key=lambda c: prefer.index(c.kwargs["BLOCK_K"]) if c.kwargs["BLOCK_K"] in prefer else len(prefer))
        return ok or [min(configs, key=lambda c: c.kwargs["BLOCK_K"])]
    return rank


_RANK_FWD, _RANK_BWD = _ranker("fwd"), _ranker("bwd")
pool_fwd_tuned = tuned(pool_fwd_kernel, FWD_CONFIGS, key=["S", "B", "H", "L", "D", "NSPLIT", "BLOCK_L"],
                       rank=_RANK_FWD)
pool_bwd_tuned = tuned(pool_bwd_kernel, BWD_CONFIGS, key=["S", "B", "H", "L", "D", "BLOCK_L"], rank=_RANK_BWD)


def choose_block_l(S: int, B: int, L: int, device, nsplit=None) -> int:
    """Rows per program (16, 32 or 64): the most that still gives two waves of (s, b, tile)
    programs, or with ``nsplit`` the fewest that cut L into at most that many tiles."""
    if nsplit is not None:
        return min(64, max(16, next_pow2(cdiv(L, max(1, int(nsplit))))))
    for bl in (64, 32):
        if S * B * cdiv(L, bl) >= 2 * sm_count(device):
            return bl
    return 16


def combine_slices(programs: int, D: int, block_p: int, sms: int):
    """(BLOCK_D, columns a program) of the merge of the forward's tile partials, ``programs``
    rows (s, b, h) of D columns from ``block_p`` partials each: D whole per program where the rows
    alone give two waves of programs on ``sms`` SMs (64 students), else cut into slices of a power
    of two, as narrow as two waves need but at least 32 columns (128-byte rows). At one image of
    ``ttt-l14`` the 8 rows alone kept 8 SMs busy, each reading 64 partials of 768 fp32 columns
    (196 KB); in slices of 32 columns, 192 programs read 8 KB each."""
    widest = min(next_pow2(D), max(16, 8192 // block_p))
    slices = cdiv(2 * sms, max(1, programs))
    if slices <= 1:
        return widest, D
    chunk = min(widest, max(32, next_pow2(cdiv(D, slices))))
    return (chunk, D) if chunk >= D else (chunk, chunk)


def _run(raw, tuned_fn, rank, grid, args, meta, named):
    if autotune_enabled():
        tuned_fn[grid](*args, **meta)
    else:
        cfg = INTERP_CONFIG if INTERPRET else rank(tuned_fn.configs, named)[0]
        kw = config_kwargs(cfg)
        raw[grid(kw) if callable(grid) else grid](*args, **meta, **kw)


def _prec(f) -> str:
    return "ieee" if f.dtype == torch.float32 else "tf32"


def pool_fwd(f, pos_out, kt, scale, *, nsplit=None):
    """sbar (S, B, H, D) and lse (S, B, H), fp32: see TorchPrimitives.pool_fwd. ``nsplit``: at
    most this many tiles of rows per (s, b) (default: :func:`choose_block_l`)."""
    S, B, L, D = f.shape
    H = kt.shape[1]
    dev = f.device
    bl = choose_block_l(S, B, L, dev, nsplit)
    nsplit = cdiv(L, bl)
    sbar = _c.empty((S, B, H, D), device=dev, dtype=torch.float32)
    lse = _c.empty((S, B, H), device=dev, dtype=torch.float32)
    progs = S * B * H
    if nsplit > 1:
        pm = _c.empty((progs, nsplit), device=dev, dtype=torch.float32)
        pl = _c.empty(pm.shape, device=dev, dtype=pm.dtype)
        pacc = _c.empty((progs, nsplit, D), device=dev, dtype=torch.float32)
    else:
        pm = pl = pacc = lse
    args = [f, pos_out, kt, sbar, lse, pm, pl, pacc, S, B, H, L, D, nsplit, float(scale) * _LOG2E,
            *f.stride(), *pos_out.stride(), *kt.stride()]
    meta = dict(FINAL=nsplit == 1, PREC=_prec(f), BLOCK_L=bl, BLOCK_H=max(16, next_pow2(H)))
    _run(pool_fwd_kernel, pool_fwd_tuned, _RANK_FWD, (S * B, nsplit), args, meta, {"D": D, "BLOCK_L": bl})
    if nsplit > 1:
        bp = max(2, next_pow2(nsplit))
        bd, chunk = combine_slices(progs, D, bp, sm_count(dev))
        pool_combine_kernel[(progs, cdiv(D, chunk))](pm, pl, pacc, sbar, lse, nsplit, D, chunk, BLOCK_P=bp,
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

    bl = choose_block_l(S, B, L, dev)
    meta = dict(PREC=_prec(f), BLOCK_L=bl, BLOCK_H=max(16, next_pow2(H)))
    _run(pool_bwd_kernel, pool_bwd_tuned, _RANK_BWD, (S * B * cdiv(L, bl),), args, meta, {"D": D, "BLOCK_L": bl})
    # dkt[s, h] = sum_{b,l} c[s, (b,l), h] * (f[s, b, l] + pos_out[l]); fp32 products (tf32 on
    # tensor cores for 16-bit models, true fp32 in fp32 mode)
    dkt, _ = weight_grad(c, (c.stride(0), L * c.stride(1), c.stride(1), c.stride(2)),
                         f, (f.stride(0), f.stride(1), f.stride(2), f.stride(3)), S=S, L=L, NSEG=B, N=H, K=D,
                         x2=pos_out, x2_st=(0, 0, pos_out.stride(0), pos_out.stride(1)), x2_mode=2,
                         bias=False, dot_dtype=torch.float32, prec=_prec(f), split=split)
    return df, dkt
