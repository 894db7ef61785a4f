"""Fused, capturable Adam over flat parameter buffers (no weight decay), in one launch.

Per element: m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
             p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
exactly torch.optim.Adam's order of operations (its fp32 `/` and ``tl.sqrt`` compile to PTX's
div.full.f32 and sqrt.approx.ftz.f32, a few ulp of an update of size ~lr; the cuda table's kernel
uses the same two, ``csrc/cuda/adam.cu``). ``step`` (t) and ``lr`` are read from device
memory by every program, so the launch has no host value that changes between steps and the
update can sit in a CUDA graph (the caller bumps ``step`` on the device). The optional low-precision
copy (the bf16 weights the GEMMs read) is written in the same pass. The moments may be bf16
(fp32 parameters): read into fp32, updated there, rounded once when stored (22 B per parameter
moved instead of 30).

1 - beta^t is computed in fp64 by binary powering from (1 - beta) (passed as its own fp32
argument): the naive fp32 1 - exp2(t log2 beta) loses four digits at t = 1, beta2 = 0.999, and so
would an fp32 beta2 (0.999 is not representable: 1 - fl(0.999) is off by 1e-5 relative).

Not autotuned: it is memory bound, and benchmarking an in-place update would need every buffer
saved and restored. 1024 elements per program with 4 warps: on the H200, 145 us for 19.6 M
fp32 parameters with a bf16 copy (4.05 TB/s of the 4.23 a device copy reaches), against 148 us
for 2048 with 8 warps (the former setting) and 168 us for 4096
(``benchmarks/results/h200/measured-not-kept/9e245fd-fused-wgrad-adam.json``, key "adam").

At step 1 the moments are not read (masked loads, no memory traffic) but taken as zeros, what
they are at a first update: the same update, bit for bit, and the engine's reset to the snapshot
need not write them (the table's ``adam_fresh_at_step_one``).

A block of a weight's columns whose gradient is given by its factors (``outer``: the first
layer's trigger columns, rank one per image, and with the position code's halves its position
columns, two blocks of rank width and height) is updated with the gradient made in registers
from the factors and never stored (row by row below rank OUTER_TILED_RANK, by tiles of rows and
columns from it on): 26 B per parameter instead of 30, plus the 4 B the gradient's own kernel
would have written.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import cdiv

__all__ = ["adam_", "broadcast_"]

BLOCK = 1024
WARPS = 4
# The gradient from its factors (``outer``). Below rank OUTER_TILED_RANK, one row at a time like
# the stored gradient, with a loop over the factors (the trigger columns, rank one: by tiles it
# made the one-image step slower, 0.474 ms against 0.468 with the gradient written, H200). From
# that rank on (the position columns from the code's halves, rank 32 for ``ttt-l14``), by
# (rows x columns) tiles, so that a factor's slice serves a whole tile (about 6 B of cache reads
# an element instead of 128), as one product of the factors' slices, BK terms at a time (at
# least 16, a tl.dot's least). 32 x 64 with 4 warps was the best of eight tiles on the H200 or
# within 1 % of it (the x half of the position columns at 64 students: 0.95 ms against 1.15 for
# the plain update of the written gradient; ``benchmarks/results/h200/adam-factors/``).
OUTER_BR, OUTER_BC, OUTER_BK, OUTER_WARPS = 32, 64, 32, 4
OUTER_TILED_RANK = 16


@triton.jit
def _one_minus_pow(one_minus_beta, t):
    """1 - beta^t in fp64 by binary powering (t < 2**31): exact enough that the fp32 result is
    correctly rounded, with no cancellation and no approximate exp/log."""
    base = 1.0 - (tl.zeros((), tl.float64) + one_minus_beta)   # fp64 (a Python float when interpreted)
    r = tl.full((), 1.0, tl.float64)
    n = t
    for _ in range(31):
        r = tl.where((n & 1) == 1, r * base, r)
        base = base * base
        n = n >> 1
    return (1.0 - r).to(tl.float32)


@triton.jit
def _coefficients(step_ptr, lr_ptr, omb1, omb2):
    """lr / (1 - b1^t) and sqrt(1 - b2^t) of this update (t and lr read on the device), and
    whether it reads the moments: not at t = 1, where they are zeros (masked loads: no traffic)."""
    t = tl.load(step_ptr).to(tl.int32)
    lr = tl.load(lr_ptr).to(tl.float32)
    return lr / _one_minus_pow(omb1, t), tl.sqrt(_one_minus_pow(omb2, t)), t > 1


@triton.jit
def _update(p, g, m, v, beta1, beta2, omb1, omb2, eps, step_size, bc2_sqrt):
    """torch.optim.Adam's update of p, m, v (m, v already widened to p's dtype)."""
    m = beta1 * m + omb1 * g
    v = beta2 * v + omb2 * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    return p, m, v


@triton.jit
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, lowp_ptr, a_ptr, b_ptr, step_ptr, lr_ptr,
                C, NCB, K, sp_s, sp_r, sg_s, sg_r, sm_s, sm_r, sv_s, sv_r, sl_s, sl_r, sa_s, sa_k, sb_s, sb_k,
                beta1, beta2, omb1, omb2, eps,
                HAS_LOWP: tl.constexpr, OUTER: tl.constexpr, BLOCK: tl.constexpr):
    # program (row * NCB + column block, student): BLOCK elements of one row of (S, R, C) buffers
    pid = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    row = (pid // NCB).to(tl.int64)
    offs = (pid % NCB) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < C
    step_size, bc2_sqrt, later = _coefficients(step_ptr, lr_ptr, omb1, omb2)
    p = tl.load(p_ptr + s * sp_s + row * sp_r + offs, mask=msk, other=0.0)
    if OUTER:          # the gradient from its factors of low rank: sum_k a[s, k, row] b[s, k, offs]
        g = tl.zeros([BLOCK], p.dtype)
        for k in range(K):
            a = tl.load(a_ptr + s * sa_s + k * sa_k + row)
            g += a * tl.load(b_ptr + s * sb_s + k * sb_k + offs, mask=msk, other=0.0)
    else:
        g = tl.load(g_ptr + s * sg_s + row * sg_r + offs, mask=msk, other=0.0).to(p.dtype)
    m = tl.load(m_ptr + s * sm_s + row * sm_r + offs, mask=msk & later, other=0.0).to(p.dtype)   # bf16: widened
    v = tl.load(v_ptr + s * sv_s + row * sv_r + offs, mask=msk & later, other=0.0).to(p.dtype)
    p, m, v = _update(p, g, m, v, beta1, beta2, omb1, omb2, eps, step_size, bc2_sqrt)
    tl.store(m_ptr + s * sm_s + row * sm_r + offs, m.to(m_ptr.dtype.element_ty), mask=msk)     # rounded once
    tl.store(v_ptr + s * sv_s + row * sv_r + offs, v.to(v_ptr.dtype.element_ty), mask=msk)
    tl.store(p_ptr + s * sp_s + row * sp_r + offs, p, mask=msk)
    if HAS_LOWP:
        tl.store(lowp_ptr + s * sl_s + row * sl_r + offs, p.to(lowp_ptr.dtype.element_ty), mask=msk)


@triton.jit
def adam_outer_kernel(p_ptr, m_ptr, v_ptr, lowp_ptr, a_ptr, b_ptr, step_ptr, lr_ptr,
                      R, C, K, sp_s, sp_r, sm_s, sm_r, sv_s, sv_r, sl_s, sl_r, sa_s, sa_k, sb_s, sb_k,
                      beta1, beta2, omb1, omb2, eps,
                      HAS_LOWP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    # program (column tile, row tile, student): a (BR, BC) tile of (S, R, C) buffers whose gradient
    # is sum_k a[s, k, rows] b[s, k, cols]: a product of a's (BR, BK) and b's (BK, BC) slices (each
    # read once a tile, not once an element), summed in p's dtype by fma ("ieee": no tf32)
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    in_r = rows < R
    in_c = cols < C
    msk = in_r[:, None] & in_c[None, :]
    r64 = rows.to(tl.int64)[:, None]
    step_size, bc2_sqrt, later = _coefficients(step_ptr, lr_ptr, omb1, omb2)
    # the state's loads first: in flight while the gradient is made
    p = tl.load(p_ptr + s * sp_s + r64 * sp_r + cols[None, :], mask=msk, other=0.0)
    m = tl.load(m_ptr + s * sm_s + r64 * sm_r + cols[None, :], mask=msk & later, other=0.0).to(p.dtype)
    v = tl.load(v_ptr + s * sv_s + r64 * sv_r + cols[None, :], mask=msk & later, other=0.0).to(p.dtype)
    g = tl.zeros([BR, BC], p.dtype)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + s * sa_s + ks[None, :] * sa_k + rows[:, None], mask=in_r[:, None] & (ks[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + s * sb_s + ks[:, None] * sb_k + cols[None, :], mask=(ks[:, None] < K) & in_c[None, :],
                    other=0.0)
        g = tl.dot(a.to(p.dtype), b.to(p.dtype), g, input_precision="ieee")
    p, m, v = _update(p, g, m, v, beta1, beta2, omb1, omb2, eps, step_size, bc2_sqrt)
    tl.store(m_ptr + s * sm_s + r64 * sm_r + cols[None, :], m.to(m_ptr.dtype.element_ty), mask=msk)
    tl.store(v_ptr + s * sv_s + r64 * sv_r + cols[None, :], v.to(v_ptr.dtype.element_ty), mask=msk)
    tl.store(p_ptr + s * sp_s + r64 * sp_r + cols[None, :], p, mask=msk)
    if HAS_LOWP:
        tl.store(lowp_ptr + s * sl_s + r64 * sl_r + cols[None, :], p.to(lowp_ptr.dtype.element_ty), mask=msk)


def _rows(t):
    """(student stride, row stride) of an (S, N) or (S, R, C) buffer (None: (0, 0))."""
    if t is None:
        return 0, 0
    return t.stride(0), (t.stride(1) if t.dim() == 3 else 0)


def adam_(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, *, lowp=None, outer=None):
    """In place on (S, N) or (S, R, C) fp32 buffers with unit stride along the last dimension;
    ``outer=(a, b)`` instead of ``grads``: the gradient's factors; see TorchPrimitives.adam_."""
    S, C = params.shape[0], params.shape[-1]
    R = params.shape[1] if params.dim() == 3 else 1
    lp = lowp if lowp is not None else params
    coefs = (float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, float(eps))
    state = (*_rows(params), *_rows(exp_avg), *_rows(exp_avg_sq), *_rows(lp))
    a, b = outer if outer is not None else (None, None)
    K = a.shape[1] if a is not None else 0
    if K < OUTER_TILED_RANK:      # the gradient as stored, or from factors of a rank below
        ncb = cdiv(C, BLOCK)
        adam_kernel[(R * ncb, S)](params, grads if grads is not None else params, exp_avg, exp_avg_sq, lp,
                                  a if a is not None else params, b if b is not None else params, step, lr, C, ncb, K,
                                  *_rows(params), *_rows(grads), *state[2:],
                                  *(a.stride()[:2] if a is not None else (0, 0)),
                                  *(b.stride()[:2] if b is not None else (0, 0)), *coefs,
                                  HAS_LOWP=lowp is not None, OUTER=a is not None, BLOCK=BLOCK, num_warps=WARPS)
        return
    adam_outer_kernel[(cdiv(C, OUTER_BC), cdiv(R, OUTER_BR), S)](
        params, exp_avg, exp_avg_sq, lp, a, b, step, lr, R, C, K, *state, *a.stride()[:2], *b.stride()[:2], *coefs,
        HAS_LOWP=lowp is not None, BR=OUTER_BR, BC=OUTER_BC, BK=min(OUTER_BK, max(16, triton.next_power_of_2(K))),
        num_warps=OUTER_WARPS)


# ------------------------------------------------------------------------------------ the reset
BROADCAST_BLOCK = 1024


@triton.jit
def broadcast_kernel(dst_ptr, src_ptr, lowp_ptr, N, S, HAS_LOWP: tl.constexpr, BLOCK: tl.constexpr):
    # program: BLOCK elements of the snapshot, read once and stored into every student's copy
    # (and its compute copy, rounded to nearest even): stores only, 16 bytes at a time
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    x = tl.load(src_ptr + offs, mask=msk)
    d = dst_ptr + offs
    c = lowp_ptr + offs
    for _ in range(S):                 # the next student: N elements on (64-bit pointers)
        tl.store(d, x, mask=msk)
        if HAS_LOWP:
            tl.store(c, x.to(lowp_ptr.dtype.element_ty), mask=msk)
        d += N
        c += N


def broadcast_(dst, src, lowp=None):
    """dst[s] = src (and lowp[s] = src in lowp's dtype) for every s; dst, lowp contiguous
    (S, *src.shape); see Primitives.broadcast_. The plain broadcast copy reads its stride-0
    source through torch's generic strided kernel: 4.4 ms for the 5.6 GB of 64 ``ttt-l14``
    students' weights, 1.3 TB/s, and the compute copy read back from them, 1.9 ms (one batch's
    profile, ``benchmarks/results/h200/4ba7553-profiles/engine.json``, row
    ``profile/triton/S=64``). This one stores both, 16 bytes at a time, and reads the snapshot
    once: the whole reset of 64 students (moments left as they are) took 2.14 ms a batch on the
    H200 (``reset_ms``, ``benchmarks/results/h200/b73729e-layer-factors/suite/``)."""
    n = src.numel()
    if n == 0 or dst.shape[0] == 0:
        return
    src = src.reshape(-1)
    broadcast_kernel[(cdiv(n, BROADCAST_BLOCK),)](dst, src, lowp if lowp is not None else dst, n, dst.shape[0],
                                                  HAS_LOWP=lowp is not None, BLOCK=BROADCAST_BLOCK, num_warps=4)
