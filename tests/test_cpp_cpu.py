"""The CPU C++ ops of apm_fast._C_cpu (csrc/cpu/) against the PyTorch primitives and torch.optim.Adam.

Every output is NaN-poisoned before the call, so an element the op does not write fails the test.
Shapes are odd (no multiples of anything) and S > 1 where the op has a student dimension.
Tolerances: float64 runs agree with the float64 reference to rounding (1e-10 relative: both sum
the same terms in a different order); float32 to 1e-5 (sums of <= a few hundred terms);
bfloat16 outputs to one bf16 ulp (2^-8 relative) since both sides round the same fp32 value. The float32 atol (1e-5) covers
cancellation: the pool backward subtracts O(1) sums of a few hundred products.
"""
import math

import pytest
import torch

from apm_fast._ext import load_extension
from apm_fast.ops import TorchPrimitives

TP = TorchPrimitives()
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6)}


@pytest.fixture(scope="module")
def C():
    mod, why = load_extension("_C_cpu")
    if mod is None:  # CI must build it: a missing extension is a failure, not a skip
        pytest.fail(why, pytrace=False)
    return mod


def nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------- trigger split
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trigger_u(C, dtype):
    S, B, d, dtot, H = 2, 3, 7, 12, 13
    t, w1, b1 = rand(S, B, d, dtype=dtype), rand(S, H, dtot, dtype=dtype, seed=1), rand(S, H, dtype=dtype, seed=2)
    u = nan(S, B, H, dtype=dtype)
    C.trigger_u(t, w1, b1, u)
    ref = torch.einsum("sbk,shk->sbh", t, w1[:, :, :d]) + b1[:, None, :]
    torch.testing.assert_close(u, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_first_layer_act(C, dtype):
    S, B, L, H = 2, 3, 5, 11
    p, u = rand(S, L, H, dtype=dtype), rand(S, B, H, dtype=acc_of(dtype), seed=1)
    a = nan(S, B * L, H, dtype=dtype)
    C.first_layer_act(p, u, a)
    torch.testing.assert_close(a, TP.first_layer_act(p, u), **TOL[dtype])
    assert (a == 0).any() and (a > 0).any()  # both sides of the ReLU were exercised


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_first_layer_mask_sum(C, dtype, out_dtype):
    """g1 and r of TorchPrimitives.first_layer_bwd_input, given the GEMM result g = dy w."""
    S, B, L, H, N = 2, 3, 5, 11, 6
    acc = acc_of(dtype)
    p, u = rand(S, L, H, dtype=dtype), rand(S, B, H, dtype=acc, seed=1)
    dy, w = rand(S, B * L, N, dtype=dtype, seed=2), rand(S, N, H, dtype=dtype, seed=3)
    g = torch.bmm(dy.to(acc), w.to(acc))
    g1, r = nan(S, B * L, H, dtype=out_dtype), nan(S, B, H, dtype=acc)
    C.first_layer_mask_sum(g, p, u, g1, r)
    g1_ref, r_ref = TP.first_layer_bwd_input(dy, w, p, u, out_dtype=out_dtype)
    torch.testing.assert_close(g1, g1_ref, **TOL[out_dtype if out_dtype != torch.float32 else dtype])
    torch.testing.assert_close(r, r_ref, **TOL[acc])


# ---------------------------------------------------------------------------- pool
def pool_inputs(dtype, S=2, B=3, L=7, D=10, H=5):
    acc = acc_of(dtype)
    f = rand(S, B, L, D, dtype=dtype)
    pos = rand(L, D, dtype=dtype, seed=1)
    kt = rand(S, H, D, dtype=acc, seed=2)
    return f, pos, kt, 1.0 / math.sqrt(D / H)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pool_fwd(C, dtype):
    f, pos, kt, scale = pool_inputs(dtype)
    S, B, L, D = f.shape
    H, acc = kt.shape[1], acc_of(dtype)
    sbar, lse = nan(S, B, H, D, dtype=acc), nan(S, B, H, dtype=acc)
    C.pool_fwd(f, pos, kt, scale, sbar, lse)
    sbar_ref, lse_ref = TP.pool_fwd(f, pos, kt, scale)
    tol = TOL[acc]
    torch.testing.assert_close(sbar, sbar_ref, **tol)
    torch.testing.assert_close(lse, lse_ref, **tol)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32)])
def test_pool_bwd_matches_primitive_and_autograd(C, dtype, out_dtype):
    f, pos, kt, scale = pool_inputs(dtype)
    S, B, L, D = f.shape
    H, acc = kt.shape[1], acc_of(dtype)
    sbar, lse = TP.pool_fwd(f, pos, kt, scale)
    dsbar = rand(S, B, H, D, dtype=acc, seed=5)
    df, dkt = nan(S, B, L, D, dtype=out_dtype), nan(S, H, D, dtype=acc)
    C.pool_bwd(f, pos, kt, scale, sbar, lse, dsbar, df, dkt)
    df_ref, dkt_ref = TP.pool_bwd(f, pos, kt, scale, sbar, lse, dsbar, out_dtype=out_dtype)
    torch.testing.assert_close(df, df_ref, **TOL[acc])
    torch.testing.assert_close(dkt, dkt_ref, **TOL[acc])
    if dtype == torch.float64:  # an independent check: autograd through the forward
        fa, ka = f.clone().requires_grad_(), kt.clone().requires_grad_()
        s_a, _ = TP.pool_fwd(fa, pos, ka, scale)
        s_a.backward(dsbar)
        torch.testing.assert_close(df, fa.grad, **TOL[acc])
        torch.testing.assert_close(dkt, ka.grad, **TOL[acc])


# ---------------------------------------------------------------------------- Adam
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_matches_torch_optim(C, dtype):
    """Several steps on an odd parameter count (2 students x 1001) against torch.optim.Adam fed the
    same gradients; the bf16 copy follows the parameters."""
    S, N, steps = 2, 1001, 5
    lr, betas, eps = 3e-2, (0.9, 0.999), 1e-8
    p0 = rand(S, N, dtype=dtype)
    ref = p0.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=lr, betas=betas, eps=eps, foreach=False)
    params, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    lowp = nan(S, N, dtype=torch.bfloat16)
    step, lr_t = torch.zeros(1, dtype=torch.float32), torch.tensor([lr], dtype=torch.float32)
    for i in range(steps):
        g = rand(S, N, dtype=dtype, seed=10 + i) * (i + 1)
        ref.grad = g.clone()
        opt.step()
        step += 1
        C.adam_(params, g, m, v, step, lr_t, betas[0], betas[1], eps, lowp)
    # lr_t holds lr rounded to fp32: allow that relative difference on the total update
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(params, ref.detach(), **tol)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"], **TOL[dtype])
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], **TOL[dtype])
    assert torch.equal(lowp, params.to(torch.bfloat16))
    assert not torch.equal(params, p0)


# ---------------------------------------------------------------------------- argument checks
def test_errors_name_the_argument(C):
    f, pos, kt, scale = pool_inputs(torch.float32)
    S, B, L, D = f.shape
    H = kt.shape[1]
    sbar, lse = torch.empty(S, B, H, D), torch.empty(S, B, H)
    with pytest.raises(ValueError, match=r"pool_fwd: pos_out must have shape \(L, D\) = \[7, 10\], got \[7, 9\]"):
        C.pool_fwd(f, pos[:, :9].contiguous(), kt, scale, sbar, lse)
    with pytest.raises(TypeError, match=r"pool_fwd: kt must have dtype Float, got Double"):
        C.pool_fwd(f, pos, kt.double(), scale, sbar, lse)
    with pytest.raises(ValueError, match=r"pool_fwd: f must be contiguous"):
        C.pool_fwd(f.transpose(2, 3).contiguous().transpose(2, 3), pos, kt, scale, sbar, lse)
    p, u = torch.randn(1, 4, 6), torch.randn(1, 2, 6)
    with pytest.raises(ValueError, match=r"first_layer_act: a must have shape \(S, B\*L, H\) = \[1, 8, 6\]"):
        C.first_layer_act(p, u, torch.empty(1, 4, 6))
    params = torch.zeros(10)
    one = torch.ones(1)
    with pytest.raises(ValueError, match=r"adam_: grads must have as many elements as params \(10\), got 9"):
        C.adam_(params, torch.zeros(9), torch.zeros(10), torch.zeros(10), one, one, 0.9, 0.999, 1e-8, None)
    with pytest.raises(ValueError, match=r"adam_: step must hold the number of this update"):
        C.adam_(params, torch.zeros(10), torch.zeros(10), torch.zeros(10), torch.zeros(1), one, 0.9, 0.999,
                1e-8, None)
