"""The cuda table's Python layer (CudaPrimitives) on the CPU, against a stand-in extension.

The stand-in has the signatures of apm_fast._C_cuda (csrc/torch/cuda_module.cpp): every op is the
torch table's, with the bindings' argument order and their checks of the output buffers (shape,
dtype, unit strides). A wrong argument order, output shape or dtype in the Python layer fails
here, before any GPU run; the kernels themselves are tested on the GPU (test_cuda_backend.py).
"""
import copy

import pytest
import torch

from apm_fast import APM, APMConfig
from apm_fast.backends import cuda as cuda_backend
from apm_fast.ops.autograd import fused_forward
from apm_fast.ops.contract import TorchPrimitives, first_layer_act
from helpers import BLOCK_SHAPES, check_block_adam, check_broadcast, check_fresh_adam

TP = TorchPrimitives()


def _expect(t, shape, dtype, name):
    assert tuple(t.shape) == tuple(shape), f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}"
    assert t.dtype == dtype, f"{name}: dtype {t.dtype}, expected {dtype}"


class FakeCudaExt:
    """apm_fast._C_cuda's functions, on the CPU."""

    def __init__(self):
        self.calls = []
        self.dw_ptrs = []

    def first_layer_act(self, p, u, a, height=0, width=0):
        self.calls.append("first_layer_act" if width == 0 else "first_layer_act(halves)")
        _expect(u, (p.shape[0], u.shape[1], p.shape[2]), torch.float32, "u")
        if width:                                   # Q in fp32, a in any compute dtype
            _expect(p, (p.shape[0], width + height, p.shape[2]), torch.float32, "p (Q)")
            _expect(a, (p.shape[0], u.shape[1] * height * width, p.shape[2]), a.dtype, "a")
            a.copy_(first_layer_act(p, u, (height, width), a.dtype))
            return
        _expect(a, (p.shape[0], u.shape[1] * p.shape[1], p.shape[2]), p.dtype, "a")
        a.copy_(first_layer_act(p, u))

    def pool_fwd(self, f, pos, kt, scale, sbar, lse):
        assert f.is_contiguous() and pos.dtype == f.dtype and kt.dtype == torch.float32
        for out, ref in zip((sbar, lse), TP.pool_fwd(f, pos, kt, scale)):
            _expect(out, ref.shape, torch.float32, "sbar/lse")
            out.copy_(ref)

    def pool_bwd(self, f, pos, kt, scale, sbar, lse, dsbar, df, dkt):
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (kt, sbar, lse, dsbar))
        rdf, rdkt = TP.pool_bwd(f, pos, kt, scale, sbar, lse, dsbar, out_dtype=df.dtype)
        _expect(df, f.shape, df.dtype, "df")
        _expect(dkt, kt.shape, torch.float32, "dkt")
        df.copy_(rdf)
        dkt.copy_(rdkt)

    def adam_(self, params, grads, m, v, step, lr, b1, b2, eps, lowp, outer_a=None, outer_b=None):
        # as the binding: rows of the last dimension, one row stride apart, params' shape
        for name, t in (("params", params), ("grads", grads), ("exp_avg", m), ("exp_avg_sq", v), ("lowp", lowp)):
            if t is None:
                continue
            assert t.shape == params.shape and t.stride(-1) == 1, name
            assert all(t.shape[d] == 1 or t.stride(d) == t.shape[d + 1] * t.stride(d + 1)
                       for d in range(t.dim() - 2)), f"{name}: rows not one stride apart"
        assert (grads is None) == (outer_a is not None) and (outer_a is None) == (outer_b is None)
        for t in (outer_a, outer_b):
            assert t is None or (t.dtype == torch.float32 and t.stride(-1) == 1)
        if float(step) == 1:                    # the kernel reads no moments at step 1: zeros
            m.zero_()
            v.zero_()
        TP._adam_(params, grads, m, v, step, lr, b1, b2, eps, lowp, outer_a, outer_b)

    def broadcast_(self, dst, src, lowp=None):
        self.calls.append("broadcast_")
        # as the binding: fp32 dst (S, *src.shape) and src, lowp dst's shape, all contiguous
        assert dst.dtype == src.dtype == torch.float32 and dst.is_contiguous() and src.is_contiguous()
        assert tuple(dst.shape[1:]) == tuple(src.shape)
        assert lowp is None or (lowp.shape == dst.shape and lowp.is_contiguous())
        TP._broadcast_(dst, src, lowp)

    def linear(self, x, w, bias, relu, out):
        self.calls.append("linear")
        s, n, k = w.shape
        assert x.shape[-1] == k and x.dtype == w.dtype and x.stride(-1) == 1
        if bias is not None:
            _expect(bias, (s, n), w.dtype, "bias")
        _expect(out, (s, x.shape[-2], n), out.dtype, "out")
        out.copy_(TP.linear(x, w, bias, relu=relu, out_dtype=out.dtype))

    def linear_bwd_input(self, dy, w, mask, out):
        self.calls.append("linear_bwd_input")
        s, n, k = w.shape
        _expect(dy, (s, dy.shape[1], n), w.dtype, "dy")
        if mask is not None:
            _expect(mask, (s, dy.shape[1], k), w.dtype, "mask")
        _expect(out, (s, dy.shape[1], k), out.dtype, "out")
        out.copy_(TP.linear_bwd_input(dy, w, mask=mask, out_dtype=out.dtype))

    def linear_bwd_weight(self, dy, x, dw, db):
        self.calls.append("linear_bwd_weight")
        s, m, n = dy.shape
        assert x.shape[-2] == m and x.dtype == dy.dtype and dy.is_contiguous() and x.is_contiguous()
        _expect(dw, (s, n, x.shape[-1]), torch.float32, "dw")
        assert dw.stride(-1) == 1, "the binding takes dw with unit-stride rows"
        self.dw_ptrs.append(dw.data_ptr())
        rdw, rdb = TP.linear_bwd_weight(dy, x, bias=db is not None)
        dw.copy_(rdw)
        if db is not None:
            _expect(db, (s, n), torch.float32, "db")
            db.copy_(rdb)

    def first_layer_bwd_input(self, dy, w, p, u, g1, r, act=None):
        self.calls.append("first_layer_bwd_input" if act is None else "first_layer_bwd_input(act)")
        s, n, h = w.shape
        b = u.shape[1]
        l = p.shape[1] if p is not None else dy.shape[1] // b
        if p is None:
            assert act is not None, "p may be None only with act"
        else:
            _expect(p, (s, l, h), w.dtype, "p")
        _expect(u, (s, b, h), torch.float32, "u")
        _expect(dy, (s, b * l, n), w.dtype, "dy")
        _expect(g1, (s, b * l, h), g1.dtype, "g1")
        _expect(r, (s, b, h), torch.float32, "r")
        if act is not None:                 # the binding reads the mask from it
            _expect(act, (s, b * l, h), w.dtype, "act")
            assert act.is_contiguous()
        rg1, rr = TP.first_layer_bwd_input(dy, w, p, u, out_dtype=g1.dtype, act=act)
        g1.copy_(rg1)
        r.copy_(rr)


@pytest.fixture
def fake(monkeypatch):
    ext = FakeCudaExt()
    monkeypatch.setattr(cuda_backend, "cuda_extension", lambda: ext)
    monkeypatch.setenv("APM_FAST_POISON_OUTPUTS", "1")        # every output NaN until written
    return ext


def test_primitives_route_to_the_extension(fake):
    prims = cuda_backend.CudaPrimitives()
    g = torch.Generator().manual_seed(0)
    S, B, L, H, N, D, heads = 2, 3, 5, 12, 7, 10, 2
    r = lambda *s: torch.randn(*s, generator=g)
    p, u, w, b = r(S, L, H), r(S, B, H), r(S, N, H), r(S, N)
    torch.testing.assert_close(prims.first_layer_linear(p, u, w, b), TP.first_layer_linear(p, u, w, b))
    x_shared = r(L, H + 4)[:, 2:H + 2]  # a column slice: rows padded, as W_P = W1[:, d:] is
    torch.testing.assert_close(prims.linear(x_shared, w, None), TP.linear(x_shared, w, None))
    dy = r(S, B * L, N)
    for got, ref in zip(prims.first_layer_bwd_weight(dy, p, u), TP.first_layer_bwd_weight(dy, p, u)):
        torch.testing.assert_close(got, ref)
    for got, ref in zip(prims.first_layer_bwd_input(dy, w, p, u), TP.first_layer_bwd_input(dy, w, p, u)):
        torch.testing.assert_close(got, ref)
    act = prims.first_layer_act(p, u)
    torch.testing.assert_close(act, first_layer_act(p, u))
    for got, ref in zip(prims.first_layer_bwd_input(dy, w, p, u, act=act), TP.first_layer_bwd_input(dy, w, p, u)):
        torch.testing.assert_close(got, ref)
    assert "first_layer_bwd_input(act)" in fake.calls
    # from the position code's halves: Q (S, width + height, H) fp32 for a 2 x 3 grid's L = 6 rows
    q, dy6 = r(S, 5, H), r(S, B * 6, N)
    act6 = prims.first_layer_act(q, u, grid=(2, 3), out_dtype=torch.float32)
    torch.testing.assert_close(act6, first_layer_act(q, u, (2, 3)))
    assert "first_layer_act(halves)" in fake.calls
    for got, ref in zip(prims.first_layer_bwd_input(dy6, w, None, u, act=act6),
                        TP.first_layer_bwd_input(dy6, w, None, u, act=act6)):
        torch.testing.assert_close(got, ref)
    mask = torch.relu(r(S, B * L, H))
    torch.testing.assert_close(prims.linear_bwd_input(dy, w, mask=mask), TP.linear_bwd_input(dy, w, mask=mask))
    f, pos, kt = r(S, B, L, D), r(L, D), r(S, heads, D)
    sbar, lse = prims.pool_fwd(f, pos, kt, 0.5)
    for got, ref in zip((sbar, lse), TP.pool_fwd(f, pos, kt, 0.5)):
        torch.testing.assert_close(got, ref)
    dsbar = r(S, B, heads, D)
    for got, ref in zip(prims.pool_bwd(f, pos, kt, 0.5, sbar, lse, dsbar),
                        TP.pool_bwd(f, pos, kt, 0.5, sbar, lse, dsbar)):
        torch.testing.assert_close(got, ref)
    assert {"linear", "linear_bwd_weight", "first_layer_bwd_input", "linear_bwd_input"} <= set(fake.calls)


def test_weight_gradient_lands_in_a_column_slice_without_a_copy(fake):
    """The first layer's position columns (grad[:, :, d:] of a wider gradient) are written in
    place by the binding: no fresh buffer, no copy after."""
    g = torch.Generator().manual_seed(2)
    S, M, N, K, d = 2, 6, 5, 4, 3
    dy, x = torch.randn(S, M, N, generator=g), torch.randn(M, K, generator=g)
    wide = torch.full((S, N, d + K), 7.0)
    view = wide[:, :, d:]
    dw, db = cuda_backend.CudaPrimitives().linear_bwd_weight(dy, x, bias=False, out=view)
    assert db is None and fake.dw_ptrs == [view.data_ptr()]
    torch.testing.assert_close(view, TP.linear_bwd_weight(dy, x, bias=False)[0])
    assert torch.equal(wide[:, :, :d], torch.full((S, N, d), 7.0))      # the other columns untouched


def test_adam_on_padded_rows_matches_the_primitive(fake):
    """(S, n) views with padded rows (as a slice of a wider buffer) go to the kernel as they are
    (rows one stride apart)."""
    g = torch.Generator().manual_seed(1)
    wide = [torch.randn(3, 11, generator=g) for _ in range(4)]
    wide[3] = wide[3].abs()                                # exp_avg_sq >= 0
    ours = [w.clone()[:, 2:9] for w in wide]
    ref = [w.clone()[:, 2:9] for w in wide]
    step, lr = torch.tensor([3.0]), torch.tensor([0.01])
    cuda_backend.CudaPrimitives().adam_(ours[0], ours[1], ours[2], ours[3], step, lr, 0.9, 0.999, 1e-8)
    TP.adam_(ref[0], ref[1], ref[2], ref[3], step, lr, 0.9, 0.999, 1e-8)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert not ours[0].is_contiguous()


def test_float64_is_refused_with_a_clear_error(fake):
    prims = cuda_backend.CudaPrimitives()
    with pytest.raises(TypeError, match="cuda backend computes in float32, bfloat16 or float16"):
        prims.linear(torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 4, 3, dtype=torch.float64))


def test_whole_model_through_the_cuda_layer(fake):
    """Forward and every gradient of the fused driver over CudaPrimitives (fp32) vs the float64
    reference model: the plumbing of all primitives together."""
    cfg = APMConfig(grid=3, patch=2, hidden=(12, 10, 8), dim=8, heads=2, init="pytorch")
    torch.manual_seed(0)
    m64 = APM(cfg, dtype=torch.float64)
    m32 = copy.deepcopy(m64).float()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, dtype=torch.float64)
    out = m64(images, backend="reference")
    (out.cls.sum() + out.grid.square().sum()).backward()
    cls, grid = fused_forward(cuda_backend.CudaPrimitives(), m32, images.float(), torch.float32)
    (cls.sum() + grid.square().sum()).backward()
    torch.testing.assert_close(cls.double(), out.cls.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grid.double(), out.grid.detach(), rtol=1e-4, atol=1e-5)
    ref = dict(m64.named_parameters())
    for name, p in m32.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_adam_over_column_blocks_and_from_factors_reaches_the_binding(fake, moments, shape):
    """Column blocks of a weight ((S, R, C) views, rows one stride apart) and a gradient given by
    its factors go to the binding as they are: the plain table's update over the whole weight."""
    check_block_adam(cuda_backend.CudaPrimitives(), "cpu", moments, shape)


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_the_reset_reaches_the_binding(fake, moments):
    """The cuda table's reset: fp32 weights broadcast by the binding (fp64 ones by the plain copy),
    and its Adam, which says it reads no moments at step 1, handed them as they are."""
    prims = cuda_backend.CudaPrimitives()
    assert prims.adam_fresh_at_step_one
    check_fresh_adam(prims, "cpu", moments)
    check_broadcast(prims, "cpu")
    assert "broadcast_" in fake.calls
    fake.calls.clear()
    dst = torch.zeros(2, 3, dtype=torch.float64)
    prims.broadcast_(dst, torch.arange(3.0, dtype=torch.float64))
    assert torch.equal(dst, torch.arange(3.0, dtype=torch.float64).expand(2, 3)) and fake.calls == []

