"""The cuda backend on a GPU: every primitive and the whole model against float64 references.

* Primitives (CudaPrimitives) against TorchPrimitives run in float64 on the same rounded inputs,
  on shapes the SM90 kernels take (multiples of 8) and odd ones (portable kernel), S = 2. Every
  output is NaN-poisoned (the backend's allocator is swapped for a NaN fill).
* The whole model (outputs, every parameter gradient, several Adam steps) against the float64
  reference model (backend "reference", the plain form): in fp32 (portable GEMMs, tight) and in
  bf16 (SM90 GEMMs where the shapes allow), where the tolerance is relative to the error of the
  same fused algebra run in PyTorch at the same precision (rounding at the same points).

Skipped without a GPU; without the built extension skipped too, unless APM_FAST_REQUIRE_CUDA_EXT=1
(the GPU check script sets it) turns that into a failure.
"""
import copy
import math
import os

import pytest
import torch

from apm_fast import APM, APMConfig
from apm_fast._ext import load_extension
from apm_fast.ops.autograd import fused_forward
from apm_fast.ops.contract import TorchPrimitives, first_layer_act
from apm_fast.ops.precision import compute_dtype
from helpers import BLOCK_SHAPES, check_bf16_moment_adam, check_block_adam, check_broadcast, check_fresh_adam, precision

pytestmark = pytest.mark.gpu

TP = TorchPrimitives()
DEV = "cuda"


@pytest.fixture(scope="module")
def ext():
    mod, why = load_extension()
    if mod is None:
        if os.environ.get("APM_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return mod


@pytest.fixture
def prims(ext, monkeypatch):
    """CudaPrimitives whose outputs start as NaN; the GEMM path policy restored afterwards."""
    from apm_fast.backends.cuda import CudaPrimitives

    monkeypatch.setenv("APM_FAST_POISON_OUTPUTS", "1")
    policy = ext.gemm_policy()
    yield CudaPrimitives()
    ext.set_gemm_policy(policy)


def rnd(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32) * scale).to(dtype)


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values (an element not written?)"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# bf16 outputs carry one rounding (2^-9 relative, ~2^-9 / sqrt(3) rms); fp32 GEMMs on CUDA cores
# accumulate in fp32 (K <= 300 here: ~1e-6). Errors are compared as relative Frobenius norms.
TOL = {torch.bfloat16: 8e-3, torch.float32: 2e-5}
ALIGNED = dict(S=2, M=200, N=136, K=264)   # SM90-eligible: every row a multiple of 16 bytes
WIDE = dict(S=1, M=1024, N=2048, K=64)     # SM90 on 128 x 128 tiles (ALIGNED's few fill 128 x 64 ones)
ODD = dict(S=2, M=37, N=29, K=45)          # portable kernel
SPLITK = dict(S=1, M=4096, N=64, K=72)     # one output tile: the weight gradient's cuBLAS route


def gemm_counts_delta(ext, fn):
    ext.reset_gemm_counts()
    out = fn()
    torch.cuda.synchronize()
    return out, ext.gemm_counts()


def expect_path(ext, counts, dtype, shape):
    """On an sm_90a build and an H100-class GPU, aligned bf16 problems must take the SM90 path
    (counts: [SM90, portable, cuBLAS] launches); a weight gradient with too few output tiles to
    fill the GPU (SPLITK) goes to cuBLAS instead."""
    sm90 = ext.sm90_available(torch.empty(1, device=DEV))
    if dtype == torch.bfloat16 and shape is SPLITK and sm90:
        assert counts == [0, 0, 1], f"expected one cuBLAS launch, got counts {counts}"
    elif dtype == torch.bfloat16 and (shape is ALIGNED or shape is WIDE) and sm90:
        assert counts[0] > 0 and counts[1] == 0 and counts[2] == 0, f"expected the SM90 kernels, got counts {counts}"
    elif dtype != torch.bfloat16 or shape is ODD:
        assert counts[0] == 0 and counts[2] == 0, f"expected the portable kernel, got counts {counts}"


# ---------------------------------------------------------------------------- GEMM primitives
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [ALIGNED, WIDE, ODD], ids=["aligned", "wide", "odd"])
@pytest.mark.parametrize("bias,relu,shared", [(True, True, False), (True, False, False), (False, False, True)])
def test_linear(prims, ext, dtype, shape, bias, relu, shared):
    S, M, N, K = shape["S"], shape["M"], shape["N"], shape["K"]
    x = rnd(M, K, dtype=dtype, seed=1) if shared else rnd(S, M, K, dtype=dtype, seed=1)
    w = rnd(S, N, K, dtype=dtype, seed=2, scale=K ** -0.5)
    b = rnd(S, N, dtype=dtype, seed=3) if bias else None
    y, counts = gemm_counts_delta(ext, lambda: prims.linear(x, w, b, relu=relu))
    ref = TP.linear(*d64(x, w, b), relu=relu)
    assert y.shape == (S, M, N) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    expect_path(ext, counts, dtype, shape)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "per-student-x"])
def test_linear_with_an_fp32_output(prims, ext, shared):
    """bf16 operands, fp32 out, no epilogue (the position code's Q = C W_P^T): on an SM90 build and
    GPU, cuBLAS; the result to fp32 accumulation's rounding, not bf16's."""
    S, M, N, K = 3, 64, 4096, 768
    x = rnd(M, K, dtype=torch.bfloat16, seed=1) if shared else rnd(S, M, K, dtype=torch.bfloat16, seed=1)
    w = rnd(S, N, K, dtype=torch.bfloat16, seed=2, scale=K ** -0.5)
    y, counts = gemm_counts_delta(ext, lambda: prims.linear(x, w, None, out_dtype=torch.float32))
    assert y.shape == (S, M, N) and y.dtype == torch.float32
    assert rel_err(y, TP.linear(*d64(x, w, None))) < 1e-5
    if ext.sm90_available(torch.empty(1, device=DEV)):
        assert counts == [0, 0, 1], f"expected one cuBLAS launch, got counts {counts}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [ALIGNED, WIDE, ODD], ids=["aligned", "wide", "odd"])
@pytest.mark.parametrize("masked", [True, False])
def test_linear_bwd_input(prims, ext, dtype, shape, masked):
    S, M, N, K = shape["S"], shape["M"], shape["N"], shape["K"]
    dy = rnd(S, M, N, dtype=dtype, seed=4)
    w = rnd(S, N, K, dtype=dtype, seed=5, scale=N ** -0.5)
    mask = torch.relu(rnd(S, M, K, dtype=dtype, seed=6)) if masked else None
    dx, counts = gemm_counts_delta(ext, lambda: prims.linear_bwd_input(dy, w, mask=mask))
    ref = TP.linear_bwd_input(*d64(dy, w), mask=None if mask is None else mask.double())
    assert rel_err(dx, ref) < TOL[dtype]
    if masked:
        assert torch.equal(dx[mask == 0], torch.zeros_like(dx[mask == 0]))
        expect_path(ext, counts, dtype, shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [ALIGNED, ODD, SPLITK], ids=["aligned", "odd", "splitk"])
@pytest.mark.parametrize("shared", [False, True])
def test_linear_bwd_weight(prims, ext, dtype, shape, shared):
    S, M, N, K = shape["S"], shape["M"], shape["N"], shape["K"]
    dy = rnd(S, M, N, dtype=dtype, seed=7)
    x = rnd(M, K, dtype=dtype, seed=8) if shared else rnd(S, M, K, dtype=dtype, seed=8)
    (dw, db), counts = gemm_counts_delta(ext, lambda: prims.linear_bwd_weight(dy, x))
    dw_ref, db_ref = TP.linear_bwd_weight(*d64(dy, x))
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    # fp32 outputs: only the fp32 accumulation error (M terms)
    assert rel_err(dw, dw_ref) < 1e-5 * max(1.0, math.sqrt(M / 100))
    assert rel_err(db, db_ref) < 1e-5 * max(1.0, math.sqrt(M / 100))
    if shape is not ODD:      # a shared x is never split: the SM90 kernel whatever the shape
        expect_path(ext, counts, dtype, ALIGNED if shared else shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("dims", [dict(S=2, B=3, L=40, H=64, N=48), dict(S=2, B=2, L=13, H=30, N=21),
                                  dict(S=3, B=1, L=300, H=264, N=72), dict(S=1, B=1, L=1024, H=4096, N=2048)],
                         ids=["aligned", "odd", "one-image", "ttt-l14"])
def test_first_layer(prims, dtype, dims):
    S, B, L, H, N = dims["S"], dims["B"], dims["L"], dims["H"], dims["N"]
    p = rnd(S, L, H, dtype=dtype, seed=9)
    u = rnd(S, B, H, dtype=torch.float32, seed=10)
    w = rnd(S, N, H, dtype=dtype, seed=11, scale=H ** -0.5)
    b = rnd(S, N, dtype=dtype, seed=12)
    dy = rnd(S, B * L, N, dtype=dtype, seed=13)
    p64, u64, w64, b64, dy64 = d64(p, u, w, b, dy)
    a = prims.first_layer_act(p, u)      # the table's materialized activation (its own kernel)
    assert rel_err(a, first_layer_act(p64, u64)) < TOL[dtype]
    y = prims.first_layer_linear(p, u, w, b, relu=True)
    assert rel_err(y, TP.first_layer_linear(p64, u64, w64, b64, relu=True)) < TOL[dtype]
    dw, db = prims.first_layer_bwd_weight(dy, p, u)
    dw_ref, db_ref = TP.first_layer_bwd_weight(dy64, p64, u64)
    # the activation is rounded to the compute dtype before the weight-gradient GEMM
    assert rel_err(dw, dw_ref) < TOL[dtype] and rel_err(db, db_ref) < 1e-5
    g1, r = prims.first_layer_bwd_input(dy, w, p, u)
    g1_ref, r_ref = TP.first_layer_bwd_input(dy64, w64, p64, u64)
    assert g1.dtype == dtype and r.dtype == torch.float32
    assert rel_err(g1, g1_ref) < TOL[dtype] and rel_err(r, r_ref) < TOL[dtype]
    # the activation kept from the forward as the mask: the same kernels on the same bits
    g1k, rk = prims.first_layer_bwd_input(dy, w, p, u, act=a)
    assert torch.equal(g1k, g1) and torch.equal(rk, r)
    g1n, rn = prims.first_layer_bwd_input(dy, w, None, u, act=a)        # no P needed then
    assert torch.equal(g1n, g1) and torch.equal(rn, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("dims", [dict(S=2, B=3, height=5, width=8, H=64), dict(S=2, B=1, height=3, width=7, H=30),
                                  dict(S=4, B=1, height=32, width=32, H=4096)], ids=["aligned", "odd", "ttt-l14"])
def test_first_layer_act_from_the_position_halves(prims, dtype, dims):
    """ReLU(Q[x] + Q[width + y] + u) from fp32 Q in the compute dtype: the same bits as the plain
    table's (the same fp32 sums in the same order, one rounding)."""
    S, B, height, width, H = (dims[k] for k in ("S", "B", "height", "width", "H"))
    q = rnd(S, width + height, H, dtype=torch.float32, seed=14)
    u = rnd(S, B, H, dtype=torch.float32, seed=15)
    a = prims.first_layer_act(q, u, grid=(height, width), out_dtype=dtype)
    assert a.dtype == dtype and a.shape == (S, B * height * width, H)
    assert torch.equal(a, TP.first_layer_act(q, u, grid=(height, width), out_dtype=dtype))


# ---------------------------------------------------------------------------- pool
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("dims", [dict(S=2, B=3, L=64, D=64, H=8), dict(S=2, B=2, L=37, D=44, H=4),
                                  dict(S=1, B=1, L=1024, D=768, H=8), dict(S=3, B=2, L=1100, D=40, H=16),
                                  dict(S=40, B=2, L=300, D=64, H=8), dict(S=1, B=1, L=70, D=1400, H=16),
                                  dict(S=1, B=2, L=20, D=2048, H=16), dict(S=70, B=1, L=200, D=136, H=8)],
                         ids=["aligned", "odd", "ttt-l14", "long-rows-16-heads", "many-images-large-tiles",
                              "kt-too-wide-to-stage", "widest", "ragged-tiles-and-column-blocks"])
def test_pool(prims, dtype, dims):
    S, B, L, D, H = dims["S"], dims["B"], dims["L"], dims["D"], dims["H"]
    f = rnd(S, B, L, D, dtype=dtype, seed=14)
    pos = rnd(L, D, dtype=dtype, seed=15)
    kt = rnd(S, H, D, dtype=torch.float32, seed=16, scale=0.3)
    scale = 1.0 / math.sqrt(D / H)
    sbar, lse = prims.pool_fwd(f, pos, kt, scale)
    f64, pos64, kt64 = d64(f, pos, kt)
    sbar_ref, lse_ref = TP.pool_fwd(f64, pos64, kt64, scale)
    # fp32 arithmetic on exactly representable inputs: fp32 rounding only
    assert rel_err(sbar, sbar_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-6
    dsbar = rnd(S, B, H, D, dtype=torch.float32, seed=17)
    for out_dtype in (dtype, torch.float32):
        df, dkt = prims.pool_bwd(f, pos, kt, scale, sbar, lse, dsbar, out_dtype=out_dtype)
        df_ref, dkt_ref = TP.pool_bwd(f64, pos64, kt64, scale, sbar_ref, lse_ref, dsbar.double())
        assert df.dtype == out_dtype
        # fp32: the backward subtracts O(1) sums (c = a (kv.dsbar - sbar.dsbar)): allow 1e-4
        assert rel_err(df, df_ref) < (TOL[out_dtype] if out_dtype != torch.float32 else 1e-4)
        assert rel_err(dkt, dkt_ref) < 1e-4


# ---------------------------------------------------------------------------- Adam
def test_adam_with_bf16_moments_matches_the_plain_table(prims):
    check_bf16_moment_adam(prims, DEV)


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_adam_over_column_blocks_and_from_factors_matches_the_plain_table(prims, moments, shape):
    check_block_adam(prims, DEV, moments, shape)


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_adam_reads_the_moments_at_step_one_as_the_table_says(prims, moments):
    check_fresh_adam(prims, DEV, moments)


def test_the_reset_broadcast_matches_the_plain_copy(prims):
    check_broadcast(prims, DEV)


def test_adam_matches_torch_optim_and_replays_in_a_graph(prims):
    S, N, steps = 2, 100_003, 4
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
    p0 = rnd(S, N, dtype=torch.float32, seed=18)
    grads = [rnd(S, N, dtype=torch.float32, seed=19 + i) * (i + 1) for i in range(steps)]
    ref = p0.double().clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=lr, betas=betas, eps=eps)
    params, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    lowp = torch.full((S, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    step = torch.zeros(1, device=DEV)
    lr_t = torch.full((1,), lr, device=DEV)
    for g in grads:
        ref.grad = g.double()
        opt.step()
        step += 1
        prims.adam_(params, g, m, v, step, lr_t, betas[0], betas[1], eps, lowp=lowp)
    # fp32 state vs fp64: a few fp32 roundings per step on updates of size ~lr
    torch.testing.assert_close(params.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(lowp, params.to(torch.bfloat16))
    # capturable: one graph replayed `steps` times (step and lr read on the device) = eager steps
    params2, m2, v2 = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    step2 = torch.zeros(1, device=DEV)
    g_static = grads[0].clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step2.add_(1)
        prims.adam_(params2, g_static, m2, v2, step2, lr_t, betas[0], betas[1], eps)
    for g in grads:
        g_static.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    assert step2.item() == steps
    torch.testing.assert_close(params2, params, rtol=0, atol=0)


# ---------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors(prims, ext):
    w = rnd(1, 8, 16, dtype=torch.bfloat16, seed=0)
    with pytest.raises(RuntimeError, match="linear: x must be a CUDA tensor"):
        ext.linear(torch.zeros(1, 4, 16, dtype=torch.bfloat16), w, None, False,
                   torch.empty(1, 4, 8, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(TypeError, match="linear: x must have the dtype of w"):
        ext.linear(torch.zeros(1, 4, 16, device=DEV), w, None, False,
                   torch.empty(1, 4, 8, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match=r"linear: out must have shape \(S, M, N\) = \[1, 4, 8\], got \[1, 4, 9\]"):
        ext.linear(torch.zeros(1, 4, 16, dtype=torch.bfloat16, device=DEV), w, None, False,
                   torch.empty(1, 4, 9, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(TypeError, match="float64"):
        prims.linear(torch.zeros(1, 4, 16, dtype=torch.float64, device=DEV), w.double())
    f, kt = torch.zeros(1, 1, 4, 2049, device=DEV), torch.zeros(1, 8, 2049, device=DEV)
    with pytest.raises(ValueError, match="pool_fwd: the CUDA pool supports a feature width D of at most 2048, got D = 2049"):
        prims.pool_fwd(f, torch.zeros(4, 2049, device=DEV), kt, 0.1)
    f = rnd(1, 1, 4, 16, dtype=torch.bfloat16, seed=1)
    kt, sbar, dsbar = (torch.zeros(1, 2, 16, device=DEV) for _ in range(3))
    with pytest.raises(ValueError, match="pool_bwd: df must have f's dtype"):
        ext.pool_bwd(f, torch.zeros(4, 16, dtype=torch.bfloat16, device=DEV), kt, 0.1, sbar[None],
                     torch.zeros(1, 1, 2, device=DEV), dsbar[None], torch.empty(1, 1, 4, 16, dtype=torch.float16, device=DEV),
                     torch.empty(1, 2, 16, device=DEV))


# ---------------------------------------------------------------------------- whole model
SMALL = APMConfig(grid=4, patch=2, hidden=(64, 48, 32), dim=32, heads=4, init="pytorch")      # SM90 shapes
ODD_CFG = APMConfig(grid=3, patch=3, hidden=(36, 22, 18), dim=20, heads=4, init="pytorch")  # portable


def make_models(cfg, seed=0):
    torch.manual_seed(seed)
    m64 = APM(cfg, dtype=torch.float64, device=DEV)
    m32 = copy.deepcopy(m64).float()
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    images = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g, device=DEV,
                         dtype=torch.float64)
    proj_z = torch.randn(2, cfg.dim, generator=g, device=DEV, dtype=torch.float64)
    proj_f = torch.randn(2, cfg.queries, cfg.dim, generator=g, device=DEV, dtype=torch.float64)
    return m64, m32, images, proj_z, proj_f


def loss_of(cls, grid, proj_z, proj_f):
    return (cls.double() * proj_z).sum() + (grid.double() * proj_f).sum() / grid.shape[1]


def run_model(model, images, proj_z, proj_f, *, backend=None, prim=None):
    model.zero_grad(set_to_none=True)
    imgs = images.to(model.dtype)
    if prim is not None:
        cls, grid = fused_forward(prim, model, imgs, compute_dtype(model.dtype, imgs.device))
    else:
        out = model(imgs, backend=backend)
        cls, grid = out.cls, out.grid
    loss = loss_of(cls, grid, proj_z, proj_f)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return cls.detach(), grid.detach(), grads


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [SMALL, ODD_CFG], ids=["aligned", "odd"])
def test_whole_model_outputs_and_gradients(prims, ext, cfg, mode):
    m64, m32, images, pz, pf = make_models(cfg)
    ref = run_model(m64, images, pz, pf, backend="reference")
    with precision(mode):
        ext.reset_gemm_counts()
        ours = run_model(m32, images, pz, pf, backend="cuda")
        counts = ext.gemm_counts()
        same_prec = run_model(copy.deepcopy(m32), images, pz, pf, prim=TP)  # PyTorch, same roundings
    assert sum(counts) > 0
    if mode == "bf16" and cfg is SMALL and ext.sm90_available(images):
        assert counts[0] > 0, f"the SM90 kernels never ran: counts {counts}"
    names = sorted(ref[2])
    assert sorted(ours[2]) == names, "every parameter of the fused path must get a gradient"
    pairs = [("cls", ours[0], same_prec[0], ref[0]), ("grid", ours[1], same_prec[1], ref[1])]
    pairs += [(n, ours[2][n], same_prec[2][n], ref[2][n]) for n in names]
    for name, x, y, r in pairs:
        e_ours, e_torch = rel_err(x, r), rel_err(y, r)
        if mode == "fp32":
            assert e_ours < 1e-4, f"{name}: relative error {e_ours:.2e} (fp32)"
        else:
            # bf16: both round to bf16 at the same points but accumulate in different orders, so
            # their errors are alike, not equal: within 3x PyTorch's, plus a floor for tensors
            # whose own error is tiny
            assert e_ours <= 3 * e_torch + 2e-2, f"{name}: relative error {e_ours:.2e} vs PyTorch {e_torch:.2e}"


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_whole_model_adam_steps(prims, mode):
    """Three training steps: forward, backward, the backend's Adam over one flat buffer, against
    float64 torch.optim.Adam on the reference model. Adam normalizes every element's step, so an
    element whose gradient nearly cancels (relative error >> 1) may move differently: 99% of the
    elements must agree to 5% (fp32) / 75% (bf16) of one step's size, and all stay within the
    largest distance two Adam trajectories can drift apart (a few steps of size ~lr each).
    (The same loop with PyTorch's bf16 rounding on a CPU gives 0.27 lr, fp32 3e-5 lr; a wrong
    gradient or update moves most elements of a tensor by ~lr per step.)"""
    cfg, steps, lr = SMALL, 3, 1e-3
    m64, m32, images, pz, pf = make_models(cfg, seed=3)
    names = [n for n, _ in m32.named_parameters()]
    opt = torch.optim.Adam(m64.parameters(), lr=lr)
    flat = torch.cat([p.detach().reshape(-1) for p in m32.parameters()]).reshape(1, -1).contiguous()
    m_buf, v_buf = torch.zeros_like(flat), torch.zeros_like(flat)
    step, lr_t = torch.zeros(1, device=DEV), torch.full((1,), lr, device=DEV)
    params = dict(m32.named_parameters())
    with torch.no_grad():  # the model's parameters become views of the flat buffer
        off = 0
        for n in names:
            p = params[n]
            p.data = flat[0, off:off + p.numel()].view_as(p)
            off += p.numel()
    losses = []
    for _ in range(steps):
        _, _, g64 = run_model(m64, images, pz, pf, backend="reference")
        opt.step()
        with precision(mode):
            cls, grid, g32 = run_model(m32, images, pz, pf, backend="cuda")
        losses.append((loss_of(cls, grid, pz, pf).item()))
        grad_flat = torch.cat([g32[n].reshape(-1) for n in names]).reshape(1, -1)
        step += 1
        prims.adam_(flat, grad_flat, m_buf, v_buf, step, lr_t, 0.9, 0.999, 1e-8)
    diff = (flat[0].double() - torch.cat([p.detach().reshape(-1) for p in m64.parameters()])).abs()
    frac_tol = 0.05 if mode == "fp32" else 0.75
    assert torch.quantile(diff, 0.99).item() <= frac_tol * lr, f"99th percentile {torch.quantile(diff, 0.99):.2e}"
    assert diff.max().item() <= 3 * 2 * steps * lr
    assert all(math.isfinite(x) for x in losses)
