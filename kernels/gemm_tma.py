"""The row-tiled GEMM of ``gemm.py`` with its operands loaded through TMA descriptors (Hopper), in
an optionally persistent tile loop, and the elementwise kernel that materializes ReLU(P + u).

Same four primitives, same prologue/epilogue flags as ``gemm.gemm_kernel``; what differs:

* A and B are host-side tensor descriptors over 2-D views: A's rows are ``s * a_rs + seg * a_rb + l``
  (a_rs = 0 for an operand shared by the students, a_rb = 0 for P, which every image reads), B's
  rows start at ``s * b_rs``. B is either (N, K) rows (``B_KMAJOR``: w of the forward, used as
  b^T) or (K, N) rows (w of the input gradient). 16-bit tiles go straight to shared memory and
  wgmma reads them there; only the first layer's prologue takes A through registers.
* Bounds: TMA fills what lies past a view's last row or column with zeros. Columns (K and N) are
  the views' inner dimension, so the K tail multiplies zeros. Rows past a segment's end may belong
  to the next student or image: the launcher only uses this kernel where that cannot change a
  stored value (the rows past L only reach output rows that are masked; the epilogue's ReLU mask
  and the r sums mask them explicitly; a B tile that runs into the next student's rows only reaches
  output columns past N, or, for the input gradient, requires K % BLOCK_K == 0 when S > 1).
* The output is written by a TMA store when the tiles cannot run past a segment (``Y_TMA``),
  otherwise by masked pointer stores.
* ``NUM_PROGS`` programs walk the tiles (s, row tile, column tile) with stride NUM_PROGS: one
  program per SM (persistent) or one per tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import gemm_epilogue

__all__ = ["gemm_tma_kernel", "first_layer_act_kernel"]


@triton.jit
def gemm_tma_kernel(
    a_desc, b_desc, y_desc,
    u_ptr, bias_ptr, m_ptr, y_ptr, r_ptr,
    S, L, NSEG, N, K, NUM_PROGS,
    a_rs, a_rb, b_rs,
    su_s, su_b, su_x,
    sbias_s,
    sm_s, sm_b, sm_l, sm_n,
    sy_s, sy_b, sy_l, sy_n,
    sr_s, sr_b,
    PROLOGUE: tl.constexpr,   # 0: A as stored; 1: A = ReLU(a + u[seg]) (first layer)
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    EPI_MASK: tl.constexpr,   # 0: none; 1: C *= (m > 0); 2: C *= (m + u[seg] > 0), r[seg] += sum_l C;
                              # 3: C *= (m > 0), r[seg] += sum_l C
    B_KMAJOR: tl.constexpr,   # B tiles are (BLOCK_N, BLOCK_K) slices of (N, K) rows, used transposed
    Y_TMA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_l = tl.cdiv(L, BLOCK_M)
    num_m = NSEG * tiles_l
    num_n = tl.cdiv(N, BLOCK_N)
    per_s = num_m * num_n
    total = S * per_s
    width = GROUP_M * num_n
    for t in range(pid, total, NUM_PROGS):
        s = t // per_s
        tt = t % per_s
        # grouped order within a student: GROUP_M row tiles share the B column tiles in L2
        first_m = (tt // width) * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tt % width) % gsize
        pid_n = (tt % width) // gsize
        seg = pid_m // tiles_l
        l0 = (pid_m % tiles_l) * BLOCK_M
        n0 = pid_n * BLOCK_N
        a_row = s * a_rs + seg * a_rb + l0
        s64 = s.to(tl.int64)
        seg64 = seg.to(tl.int64)
        u_row = u_ptr + s64 * su_s + seg64 * su_b
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([a_row, k0])
            if PROLOGUE == 1:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                u = tl.load(u_row + offs_k * su_x, mask=offs_k < K, other=0.0)
                # the first layer's activation, made here and never written: ReLU(P_l + u_b)
                a = tl.maximum(a.to(tl.float32) + u.to(tl.float32)[None, :], 0.0)
            if B_KMAJOR:
                b = b_desc.load([s * b_rs + n0, k0])
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE).T, acc, input_precision=PREC)
            else:
                b = b_desc.load([s * b_rs + k0, n0])
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PREC)

        offs_l = l0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_l = offs_l < L
        in_n = offs_n < N
        # rows past L may hold another image's products here (TMA rows): the mask zeroes them
        acc, tile_mask = gemm_epilogue(acc, offs_l, offs_n, in_l, in_n, bias_ptr + s64 * sbias_s,
                                       m_ptr + s64 * sm_s + seg64 * sm_b, u_row, r_ptr + s64 * sr_s + seg64 * sr_b,
                                       sm_l, sm_n, su_x, HAS_BIAS, RELU, EPI_MASK, True)
        if Y_TMA:
            y_desc.store([(s * NSEG + seg) * L + l0, n0], acc.to(y_ptr.dtype.element_ty))
        else:
            y_ptrs = y_ptr + s64 * sy_s + seg64 * sy_b + offs_l[:, None] * sy_l + offs_n[None, :] * sy_n
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def first_layer_act_kernel(p_ptr, u_ptr, a_ptr, L, H, B0, NB, W,
                           sp_s, sp_l, su_s, su_b, sa_s, sa_r,
                           HALVES: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_H: tl.constexpr):
    """a[s, (b - B0) * L + l, :] = ReLU(P[s, l, :] + u[s, b, :]) for images b in [B0, B0 + NB):
    the first layer's activation written once (fp32 adds, one rounding to a's dtype). P = p, or
    with HALVES from the position code's separable form: p holds Q (rows x of the grid's width W,
    then rows W + y) and P[y * W + x] = Q[x] + Q[W + y]. ONE_ROW (HALVES, W a multiple of
    BLOCK_R): a program's rows lie in one grid row of one image, so Q[W + y] and u[b] are read once
    as vectors (the same sums in the same order)."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_r = rows < NB * L
    in_h = cols < H
    msk = in_r[:, None] & in_h[None, :]
    if ONE_ROW:
        r0 = (pid_r * BLOCK_R).to(tl.int64)
        b0 = B0 + r0 // L
        l0 = r0 % L
        px = tl.load(p_ptr + s * sp_s + (l0 % W + tl.arange(0, BLOCK_R))[:, None] * sp_l + cols[None, :], mask=msk,
                     other=0.0)
        py = tl.load(p_ptr + s * sp_s + (W + l0 // W) * sp_l + cols, mask=in_h, other=0.0)
        u = tl.load(u_ptr + s * su_s + b0 * su_b + cols, mask=in_h, other=0.0)
        pv = px.to(tl.float32) + py.to(tl.float32)[None, :]
        a = tl.maximum(pv + u.to(tl.float32)[None, :], 0.0)
    else:
        b = (B0 + rows // L).to(tl.int64)
        l = (rows % L).to(tl.int64)
        if HALVES:
            px = tl.load(p_ptr + s * sp_s + (l % W)[:, None] * sp_l + cols[None, :], mask=msk, other=0.0)
            py = tl.load(p_ptr + s * sp_s + (W + l // W)[:, None] * sp_l + cols[None, :], mask=msk, other=0.0)
            pv = px.to(tl.float32) + py.to(tl.float32)
        else:
            pv = tl.load(p_ptr + s * sp_s + l[:, None] * sp_l + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + s * su_s + b[:, None] * su_b + cols[None, :], mask=msk, other=0.0)
        a = tl.maximum(pv + u.to(tl.float32), 0.0)
    tl.store(a_ptr + s * sa_s + rows.to(tl.int64)[:, None] * sa_r + cols[None, :], a.to(a_ptr.dtype.element_ty),
             mask=msk)
