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
are one row vector per tile, and ReLU(P + u) need not be materialized. A plain (S, M, K) operand
is one segment of L = M rows. The student dim S is grid axis 1 (its offset in int64: S * M * K can
pass 2**31). Out-of-range rows/columns are masked (odd L and widths).

Two kernels compute this: ``gemm_kernel`` below (pointer loads; any strides, any dtype) and
``gemm_tma.gemm_tma_kernel`` (TMA descriptors, optionally persistent; 16-byte aligned views). A
config (``configs.GemmCfg``) picks the kernel, the tile, and for the first layer whether ReLU(P + u)
is built in the prologue or materialized per chunk of images by a small elementwise kernel (which
then lets the plain GEMM read A straight from shared memory). Which config runs for a shape: an
explicit ``config``, else the measured table (``tuned_configs``), else the heuristic ranking
(benchmarking its top few once per shape when autotuning is on); see ``_common.pick``.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import _common as _c
from ._common import INTERPRET, as_rows, cdiv, descriptor, dot_precision, gemm_epilogue, sm_count, tl_dtype, tma_ok
from .configs import GEMM_INTERP, SMEM_BUDGET, GemmCfg, gemm_candidates, known_bad, rank_gemm, tuned_entry
from .gemm_tma import first_layer_act_kernel, gemm_tma_kernel

__all__ = ["linear", "first_layer_linear", "linear_bwd_input", "first_layer_bwd_input", "first_layer_act",
           "act_chunks", "GemmCfg"]


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
    EPI_MASK: tl.constexpr,   # 0: none; 1: C *= (m > 0); 2: C *= (m + u[seg] > 0), r[seg] += sum_l C;
                              # 3: C *= (m > 0), r[seg] += sum_l C
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

    # r[s, b] (EPI_MASK 2, 3) = sum over the image's L rows; each row tile adds its part
    acc, tile_mask = gemm_epilogue(acc, offs_l, offs_n, in_l, in_n, bias_ptr + pid_s * sbias_s,
                                   m_ptr + pid_s * sm_s + seg * sm_b, u_row, r_ptr + pid_s * sr_s + seg * sr_b,
                                   sm_l, sm_n, su_x, HAS_BIAS, RELU, EPI_MASK, False)
    y_ptrs = y_ptr + pid_s * sy_s + seg * sy_b + offs_l[:, None] * sy_l + offs_n[None, :] * sy_n
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


# ------------------------------------------------------------------------------------ one problem
class _Gemm:
    """One GEMM call: operands, output, strides and flags, launchable with any eligible config.

    a, b: the operand tensors as given (pointer kernel: with the (s, b, l, k) / (s, k, n) stride
    tuples); a2, b2: their 2-D row views for TMA (None when the layout has none) with the row
    offsets a_rs (per student), a_rb (per segment), b_rs (per student); b_kmajor: b2's rows are
    the output columns (forward) rather than the reduction (input gradient)."""

    def __init__(self, *, a, a_st, a2, a_rs, a_rb, b, b_st, b2, b_rs, b_kmajor, y, y_st, S, L, NSEG, N, K,
                 prologue=0, u=None, bias=None, relu=False, epi_mask=0, mask=None, m_st=(0, 0, 0, 0),
                 r=None, dot_dtype):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.elt = b.element_size()
        self.y2 = as_rows(y)

    # -------------------------------------------------------------- eligibility
    def tma_ok(self, cfg: GemmCfg) -> bool:
        if not (_c.HAS_TMA and tma_ok(self.a2) and tma_ok(self.b2)):
            return False
        if not self.b_kmajor and self.S > 1 and self.K % cfg.bk:
            return False      # the last K tile would read the next student's rows of w
        return True

    def y_tma(self, cfg: GemmCfg) -> bool:
        """Store through TMA: the tiles cannot run past a segment, and the staging tile fits."""
        return (tma_ok(self.y2) and (self.S * self.NSEG == 1 or self.L % cfg.bm == 0)
                and cfg.smem(self.elt, self.y.element_size()) <= SMEM_BUDGET)

    def ok(self, cfg: GemmCfg) -> bool:
        return not cfg.tma or self.tma_ok(cfg)

    # -------------------------------------------------------------- launch
    def _common_args(self):
        dummy = self.y
        u_st = (self.u.stride(0), self.u.stride(1), self.u.stride(2)) if self.u is not None else (0, 0, 0)
        y_st = self.y_st
        r_st = (self.r.stride(0), self.r.stride(1)) if self.r is not None else (0, 0)
        ptrs = [self.u if self.u is not None else dummy, self.bias if self.bias is not None else dummy,
                self.mask if self.mask is not None else dummy, self.y, self.r if self.r is not None else dummy]
        return ptrs, u_st, y_st, r_st

    def launch(self, cfg: GemmCfg):
        if self.r is not None:
            self.r.zero_()       # the r sums are atomics: every launch starts from zero
        ptrs, u_st, y_st, r_st = self._common_args()
        u_, bias_, m_, y_, r_ = ptrs
        sbias = self.bias.stride(0) if self.bias is not None else 0
        meta = dict(PROLOGUE=self.prologue, HAS_BIAS=self.bias is not None, RELU=self.relu,
                    EPI_MASK=self.epi_mask, DOT_DTYPE=tl_dtype(self.dot_dtype), PREC=dot_precision(self.dot_dtype),
                    BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=cfg.group,
                    num_warps=cfg.warps, num_stages=cfg.stages)
        S, L, NSEG, N, K = self.S, self.L, self.NSEG, self.N, self.K
        tiles = S * NSEG * cdiv(L, cfg.bm) * cdiv(N, cfg.bn)
        if not cfg.tma:
            grid = (NSEG * cdiv(L, cfg.bm) * cdiv(N, cfg.bn), S)
            gemm_kernel[grid](self.a, u_, self.b, bias_, m_, y_, r_, S, L, NSEG, N, K, *self.a_st, *u_st,
                              *self.b_st, sbias, *self.m_st, *y_st, *r_st, **meta, EVEN_K=K % cfg.bk == 0)
            return
        if not self.tma_ok(cfg):
            raise ValueError(f"gemm: config {cfg.name()} needs TMA-describable operands (unit last stride, "
                             f"16-byte aligned rows and base)")
        a_d = descriptor(self.a2, (cfg.bm, cfg.bk))
        b_d = descriptor(self.b2, (cfg.bn, cfg.bk) if self.b_kmajor else (cfg.bk, cfg.bn))
        y_tma = self.y_tma(cfg)
        y_d = descriptor(self.y2, (cfg.bm, cfg.bn)) if y_tma else a_d
        progs = min(tiles, sm_count(self.y.device)) if cfg.persistent else tiles
        gemm_tma_kernel[(progs,)](a_d, b_d, y_d, u_, bias_, m_, y_, r_, S, L, NSEG, N, K, progs,
                                  self.a_rs, self.a_rb, self.b_rs, *u_st, sbias, *self.m_st, *y_st, *r_st,
                                  B_KMAJOR=self.b_kmajor, Y_TMA=y_tma, **meta)

    # -------------------------------------------------------------- choice
    def ranked(self):
        elt = self.elt
        if INTERPRET:        # small tiles; the pointer kernel first (the TMA ones when asked or tuned)
            cands = [GEMM_INTERP, replace(GEMM_INTERP, tma=True), replace(GEMM_INTERP, tma=True, persistent=True)]
            return [c for c in cands if self.ok(c) and (_c.tma_allowed() or not c.tma)]
        cands = gemm_candidates(elt, _c.tma_allowed() and self.tma_ok(GemmCfg(128, 128, 64, 8, 3)),
                                prologue=self.prologue == 1)
        ranked = rank_gemm(cands, S=self.S, NSEG=self.NSEG, L=self.L, N=self.N, sms=sm_count(self.y.device),
                           elt=elt, out_elt=self.y.element_size())
        return [c for c in ranked if self.ok(c)]


def _choose(prim, key, prob: _Gemm, config, run=None):
    """The config to launch: explicit, else the table's (if these operands can take it), else the
    ranking (autotuned when on)."""
    if config is not None:
        return config
    entry = tuned_entry(prim, key, GemmCfg, prob.elt, prob.y.device)
    if entry is not None and known_bad(entry, prologue=prob.prologue == 1):
        entry = None       # a hand-edited table must not bring back a miscompiled variant
    if entry is not None and (entry.materialize or prob.ok(entry)) and (_c.tma_allowed() or not entry.tma):
        return entry
    ranked = prob.ranked()
    return _c.pick((prim, *key, str(prob.dot_dtype), prob.tma_ok(GemmCfg(128, 128, 64, 8, 3))), ranked,
                   run or prob.launch, prob.y.device)


def _rows(t, nseg):
    """(s, b, l) strides of an (S, nseg * L, X) tensor seen as nseg segments of L rows."""
    L = t.shape[1] // nseg
    return (t.stride(0), L * t.stride(1), t.stride(1))


# ------------------------------------------------------------------------------------ launchers
# Shapes are checked by the caller (apm_fast.backends.triton_backend); these assume them.

def _linear_problem(x, w, b, y, *, relu, S, M, N, K):
    shared = x.dim() == 2
    return _Gemm(a=x, a_st=(0 if shared else x.stride(0), 0, x.stride(-2), x.stride(-1)),
                 a2=as_rows(x), a_rs=0 if shared else M, a_rb=0,
                 b=w, b_st=(w.stride(0), w.stride(2), w.stride(1)), b2=as_rows(w), b_rs=N, b_kmajor=True,
                 y=y, y_st=(y.stride(0), 0, y.stride(1), y.stride(2)), S=S, L=M, NSEG=1, N=N, K=K,
                 bias=b, relu=relu, dot_dtype=w.dtype)


def linear(x, w, b=None, *, relu=False, out_dtype=None, config=None):
    """y = x w^T (+ b) (ReLU): x (S, M, K) or shared (M, K); w (S, N, K); b (S, N)."""
    S, N, K = w.shape
    M = x.shape[-2]
    y = _c.empty((S, M, N), device=w.device, dtype=out_dtype or w.dtype)
    prob = _linear_problem(x, w, b, y, relu=relu, S=S, M=M, N=N, K=K)
    prim = "linear_shared" if x.dim() == 2 else "linear"
    prob.launch(_choose(prim, (S, 1, M, N, K), prob, config))
    return y


# Rows of ReLU(P + u) materialized at once: 8 images of 1024 queries (64 MB at H1 = 4096, bf16),
# enough rows for several waves of 128 x 256 tiles, and a bounded buffer at any batch.
ACT_CHUNK_ROWS = 8192


def first_layer_act(p, u, *, out=None, b0=0, nb=None, grid=None, out_dtype=None):
    """ReLU(P[s, l] + u[s, b]) for images b0 .. b0 + nb as (S, nb * L, H1) in ``out_dtype`` (default
    p's dtype; into ``out``): P = p (S, L, H1), or with ``grid`` (height, width) P[y * width + x] =
    p[x] + p[width + y] from p = Q (S, width + height, H1) (see Primitives.first_layer_act)."""
    S, n, H1 = p.shape
    L, W = (n, 1) if grid is None else (grid[0] * grid[1], grid[1])
    nb = u.shape[1] - b0 if nb is None else nb
    if out is None:
        out = _c.empty((S, nb * L, H1), device=p.device, dtype=out_dtype or p.dtype)
    p_, u_ = (t if t.stride(-1) == 1 else t.contiguous() for t in (p, u))
    br, bh = (16, 16) if INTERPRET else (32, 256)
    launch = (cdiv(nb * L, br), cdiv(H1, bh), S)
    # a program's rows in one grid row: Q[W + y] and u[b] read once. Read per row, the kernel took
    # 311 us a step at 64 students against the cuda kernel's 190 (profiles of 4ba7553); with
    # ONE_ROW the step took 19.75 / 19.84 ms against 19.88 / 19.85, and 0.443 / 0.445 against
    # 0.448 / 0.446 at one image (benchmarks/results/h200/74c904c-act-one-row/)
    first_layer_act_kernel[launch](p_, u_, out, L, H1, b0, nb, W, p_.stride(0), p_.stride(1), u_.stride(0),
                                   u_.stride(1), out.stride(0), out.stride(1), HALVES=grid is not None,
                                   ONE_ROW=grid is not None and W % br == 0, BLOCK_R=br, BLOCK_H=bh, num_warps=4)
    return out


def act_chunks(p, u):
    """Yield (b0, k, a): ReLU(p + u) of images b0 .. b0 + k as (S, k * L, H1), materialized
    ACT_CHUNK_ROWS rows at a time into one reused buffer (valid until the next chunk)."""
    S, L, H1 = p.shape
    B = u.shape[1]
    nb = max(1, min(B, ACT_CHUNK_ROWS // max(1, L)))
    act = _c.empty((S, nb * L, H1), device=p.device, dtype=p.dtype)
    for b0 in range(0, B, nb):
        k = min(nb, B - b0)
        a = act.view(-1)[:S * k * L * H1].view(S, k * L, H1)     # contiguous for a shorter last chunk
        first_layer_act(p, u, out=a, b0=b0, nb=k)
        yield b0, k, a


def _first_layer_materialized(p, u, w, b, y, cfg, *, relu):
    """ReLU(P + u) written per chunk of images, each chunk then one plain GEMM into its rows of y."""
    S, L, H1 = p.shape
    N = w.shape[1]
    plain = GemmCfg(cfg.bm, cfg.bn, cfg.bk, cfg.warps, cfg.stages, cfg.group, cfg.tma, cfg.persistent)
    for b0, k, a in act_chunks(p, u):
        prob = _linear_problem(a, w, b, y[:, b0 * L:(b0 + k) * L], relu=relu, S=S, M=k * L, N=N, K=H1)
        prob.launch(plain if prob.ok(plain) else GemmCfg(cfg.bm, cfg.bn, cfg.bk, cfg.warps, cfg.stages, cfg.group))


def first_layer_linear(p, u, w, b, *, relu=True, out_dtype=None, config=None):
    """y[s, b*L + l] = ReLU(p[s, l] + u[s, b]) w^T + bias (ReLU): p (S, L, H1); u (S, B, H1);
    w (S, N, H1); b (S, N). Fused (the activation only ever exists tile by tile, in registers) or,
    when the config says so, materialized a chunk of images at a time."""
    S, L, H1 = p.shape
    B = u.shape[1]
    N = w.shape[1]
    y = _c.empty((S, B * L, N), device=w.device, dtype=out_dtype or w.dtype)
    prob = _Gemm(a=p, a_st=(p.stride(0), 0, p.stride(1), p.stride(2)), a2=as_rows(p), a_rs=L, a_rb=0,
                 b=w, b_st=(w.stride(0), w.stride(2), w.stride(1)), b2=as_rows(w), b_rs=N, b_kmajor=True,
                 y=y, y_st=(*_rows(y, B), y.stride(2)), S=S, L=L, NSEG=B, N=N, K=H1,
                 prologue=1, u=u, bias=b, relu=relu, dot_dtype=w.dtype)
    cfg = _choose("first_layer_linear", (S, B, L, N, H1), prob, config)
    if cfg.materialize:
        _first_layer_materialized(p, u, w, b, y, cfg, relu=relu)
    else:
        prob.launch(cfg)
    return y


def linear_bwd_input(dy, w, *, mask=None, out_dtype=None, config=None):
    """dx = dy w (* (mask > 0)): dy (S, M, N); w (S, N, K); mask (S, M, K) or None."""
    S, M, N = dy.shape
    K = w.shape[2]
    dx = _c.empty((S, M, K), device=w.device, dtype=out_dtype or w.dtype)
    m_st = (mask.stride(0), 0, mask.stride(1), mask.stride(2)) if mask is not None else (0, 0, 0, 0)
    prob = _Gemm(a=dy, a_st=(dy.stride(0), 0, dy.stride(1), dy.stride(2)), a2=as_rows(dy), a_rs=M, a_rb=0,
                 b=w, b_st=(w.stride(0), w.stride(1), w.stride(2)), b2=as_rows(w), b_rs=N, b_kmajor=False,
                 y=dx, y_st=(dx.stride(0), 0, dx.stride(1), dx.stride(2)), S=S, L=M, NSEG=1, N=K, K=N,
                 epi_mask=1 if mask is not None else 0, mask=mask, m_st=m_st, dot_dtype=w.dtype)
    prob.launch(_choose("linear_bwd_input", (S, 1, M, K, N), prob, config))
    return dx


def first_layer_bwd_input(dy, w, p, u, *, out_dtype=None, config=None, act=None):
    """g1 = (dy w) * (P[l] + u[b] > 0) (S, B*L, H1) and r = sum_l g1 (S, B, H1) in fp32. The mask
    from p + u in the epilogue, or from ``act`` = ReLU(P + u) as the forward wrote it (act > 0;
    p may then be None)."""
    S, N, H1 = w.shape
    B = u.shape[1]
    L = p.shape[1] if p is not None else dy.shape[1] // B
    g1 = _c.empty((S, B * L, H1), device=w.device, dtype=out_dtype or w.dtype)
    r = _c.empty((S, B, H1), device=w.device, dtype=torch.float32)      # zeroed by every launch
    if act is not None:      # the kept activation: act > 0, one mask row per row of g1
        mask, m_st, epi = act, (act.stride(0), L * act.stride(1), act.stride(1), act.stride(2)), 3
    else:                    # p + u > 0, p shared by the images
        mask, m_st, epi = p, (p.stride(0), 0, p.stride(1), p.stride(2)), 2
    prob = _Gemm(a=dy, a_st=(*_rows(dy, B), dy.stride(2)), a2=as_rows(dy), a_rs=B * L, a_rb=L,
                 b=w, b_st=(w.stride(0), w.stride(1), w.stride(2)), b2=as_rows(w), b_rs=N, b_kmajor=False,
                 y=g1, y_st=(*_rows(g1, B), g1.stride(2)), S=S, L=L, NSEG=B, N=H1, K=N,
                 u=u if epi == 2 else None, epi_mask=epi, mask=mask, m_st=m_st, r=r, dot_dtype=w.dtype)
    prob.launch(_choose("first_layer_bwd_input", (S, B, L, H1, N), prob, config))
    return g1, r
