"""Fused, capturable Adam over flat parameter buffers (no weight decay), in one launch.

Per element: m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
             p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
exactly torch.optim.Adam's order of operations. ``step`` (t) and ``lr`` are read from device
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
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import cdiv

__all__ = ["adam_"]

BLOCK = 1024
WARPS = 4


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
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, lowp_ptr, step_ptr, lr_ptr,
                N, sp_s, sg_s, sm_s, sv_s, sl_s,
                beta1, beta2, omb1, omb2, eps,
                HAS_LOWP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    t = tl.load(step_ptr).to(tl.int32)
    lr = tl.load(lr_ptr).to(tl.float32)
    bc1 = _one_minus_pow(omb1, t)
    bc2_sqrt = tl.sqrt(_one_minus_pow(omb2, t))
    g = tl.load(g_ptr + s * sg_s + offs, mask=msk, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + s * sp_s + offs, mask=msk, other=0.0)
    m = tl.load(m_ptr + s * sm_s + offs, mask=msk, other=0.0).to(p.dtype)      # bf16 moments: widened
    v = tl.load(v_ptr + s * sv_s + offs, mask=msk, other=0.0).to(p.dtype)
    m = beta1 * m + omb1 * g
    v = beta2 * v + omb2 * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - (lr / bc1) * (m / denom)
    tl.store(m_ptr + s * sm_s + offs, m.to(m_ptr.dtype.element_ty), mask=msk)     # rounded once
    tl.store(v_ptr + s * sv_s + offs, v.to(v_ptr.dtype.element_ty), mask=msk)
    tl.store(p_ptr + s * sp_s + offs, p, mask=msk)
    if HAS_LOWP:
        tl.store(lowp_ptr + s * sl_s + offs, p.to(lowp_ptr.dtype.element_ty), mask=msk)


def adam_(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, *, lowp=None):
    """In place on (S, N) fp32 buffers with unit stride along N; see TorchPrimitives.adam_."""
    S, N = params.shape
    lp = lowp if lowp is not None else params
    grid = (cdiv(N, BLOCK), S)
    adam_kernel[grid](params, grads, exp_avg, exp_avg_sq, lp, step, lr, N,
                      params.stride(0), grads.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0), lp.stride(0),
                      float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, float(eps),
                      HAS_LOWP=lowp is not None, BLOCK=BLOCK, num_warps=WARPS)
