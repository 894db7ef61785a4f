"""The one driver (apm_fast.ops.driver) with the plain-PyTorch table equals the reference model,
outputs and every gradient; combine_pool puts slices of the pool together exactly; chunked
evaluation equals the whole image; the contract checks its arguments by name."""
import math

import pytest
import torch

from apm_fast import APM, preset
from apm_fast.ops import TorchPrimitives, combine_pool
from helpers import ODD_CONFIGS, images_for, rel_err

TP = TorchPrimitives()


@pytest.mark.parametrize("cfg", ODD_CONFIGS, ids=lambda c: f"grid{c['grid']}")
def test_driver_matches_reference_f64(cfg):
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", init="pytorch", rgb_head=True, **cfg), dtype=torch.float64)
    x = images_for(model, 2)
    res = {}
    for backend in ("reference", "torch"):
        model.zero_grad(set_to_none=True)
        out = model(x, backend=backend)
        (out.cls.square().sum() + out.grid.sin().sum() + out.rgb.sum()).backward()
        res[backend] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
    (a, ga), (b, gb) = res["reference"], res["torch"]
    assert rel_err(b.cls, a.cls) < 1e-12 and rel_err(b.grid, a.grid) < 1e-12 and rel_err(b.rgb, a.rgb) < 1e-12
    d = cfg["dim"]
    for n in ga:
        x_ref, x_new = ga[n], gb[n]
        if n == "attn.in_proj_bias":  # the key bias's gradient is zero (it cancels in the softmax)
            assert x_new[d:2 * d].abs().max() == 0 and x_ref[d:2 * d].abs().max() < 1e-12
            x_ref, x_new = x_ref[torch.arange(3 * d) // d != 1], x_new[torch.arange(3 * d) // d != 1]
        assert rel_err(x_new, x_ref) < 1e-10, n


def test_combine_pool_of_slices_equals_the_pool_of_the_union():
    """Rows split in uneven slices (one empty), each slice's (sbar, lse) from pool_fwd, combined:
    the pool over all rows, in float64 to rounding."""
    torch.manual_seed(1)
    s, b, L, d, h = 2, 3, 17, 12, 3
    f, pos, kt = torch.randn(s, b, L, d, dtype=torch.float64), torch.randn(L, d, dtype=torch.float64), \
        torch.randn(s, h, d, dtype=torch.float64)
    whole = TP.pool_fwd(f, pos, kt, 0.5)
    cuts = [0, 5, 5, 11, 17]
    parts = [TP.pool_fwd(f[:, :, a:e], pos[a:e], kt, 0.5) if e > a else
             (torch.zeros(s, b, h, d, dtype=torch.float64), torch.full((s, b, h), -math.inf, dtype=torch.float64))
             for a, e in zip(cuts, cuts[1:])]
    sbar, lse = combine_pool(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    assert rel_err(sbar, whole[0]) < 1e-14 and rel_err(lse, whole[1]) < 1e-14


@pytest.mark.parametrize("chunk", [4, 9, 25, 100])
def test_chunked_columns_equal_the_whole_image(chunk):
    """Chunks of queries (several, a ragged last one, one for all) give the whole-image forward;
    another grid of locations (49 queries on a 25-query model) in chunks equals it in one chunk."""
    torch.manual_seed(10)
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), dtype=torch.float64)
    x = images_for(model, 2)
    whole = model(x, backend="reference")
    got = model(x, backend="torch", chunk=chunk)
    assert rel_err(got.cls, whole.cls) < 1e-12 and rel_err(got.grid, whole.grid) < 1e-12
    finer = model(x, backend="torch", chunk=chunk, query_grid=7, want_grid=False)
    one = model(x, backend="torch", chunk=49, query_grid=7)
    assert finer.grid is None and one.grid.shape == (2, 49, model.config.dim)
    assert rel_err(finer.cls, one.cls) < 1e-12


def test_more_chunks_than_one_fold_equal_one_chunk():
    """81 one-query chunks: the chunk loop folds its pools once after 64 chunks and once at the
    end (combine_pool in batches); the result equals one chunk of all 81 queries."""
    from apm_fast.ops import driver

    assert driver._FOLD < 81
    torch.manual_seed(11)
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), dtype=torch.float64)
    x = images_for(model, 2)
    folded = model(x, backend="torch", chunk=1, query_grid=9)
    one = model(x, backend="torch", chunk=81, query_grid=9)
    assert rel_err(folded.cls, one.cls) < 1e-12 and rel_err(folded.grid, one.grid) < 1e-12


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_replayed_chunk_equals_the_chunk_loop_and_follows_new_weights(device):
    """columns(graphs=True): the full chunks from one chunk function replayed at device offsets,
    its pool folded inside (captured as a CUDA graph on a GPU, run eagerly on the CPU), then the
    partial chunk; equal to the plain chunk loop. A second call after the weights changed in
    place reuses the captured chunk with the new weights."""
    from apm_fast.ops import driver
    from apm_fast.ops.driver import columns, weight_names

    torch.manual_seed(12)
    dt = torch.float64 if device == "cpu" else torch.float32
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), dtype=dt, device=device)
    x = images_for(model, 2).to(device)
    w = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters() if n in weight_names(model.config)}
    tol = 1e-12 if device == "cpu" else 1e-5

    def both(chunk, g):
        kw = dict(cdt=dt, chunk=chunk, query_grid=g)
        return (columns(TP, w, x, model.config, graphs=True, **kw),
                columns(TP, w, x, model.config, graphs=False, **kw))

    for chunk, g in ((4, 7), (7, 7), (9, 6)):          # ragged tails, none (49 = 7 x 7), another grid
        (cls, grid), (cls0, grid0) = both(chunk, g)
        assert rel_err(cls, cls0) < tol and rel_err(grid, grid0) < tol
    (kept,) = driver._CHUNK_GRAPH.values()
    assert (kept.graph is not None) == (device == "cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25)
    (cls, grid), (cls0, grid0) = both(9, 6)
    assert driver._CHUNK_GRAPH and next(iter(driver._CHUNK_GRAPH.values())) is kept
    assert rel_err(cls, cls0) < tol and rel_err(grid, grid0) < tol


def test_chunked_evaluation_says_what_it_cannot_do():
    model = APM(preset("ttt-l14", **ODD_CONFIGS[0]), dtype=torch.float64)
    x = images_for(model, 1)
    with pytest.raises(ValueError, match="chunked evaluation runs on the tables"):
        model(x, backend="reference", chunk=8)
    with pytest.raises(ValueError, match="chunk: expected a positive integer or None, got 0"):
        model(x, backend="torch", chunk=0)
    with pytest.raises(ValueError, match="query_grid: expected a positive integer or None, got True"):
        model(x, backend="torch", query_grid=True)
    import numpy as np                       # numpy integers count as integers (a sweep's values)
    a, b = model(x, backend="torch", chunk=np.int64(8)), model(x, backend="torch", chunk=8)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.grid, b.grid)
    with pytest.raises(ValueError, match="want_rgb"):
        model(x, backend="torch", chunk=8, want_rgb=True)


def test_precision_follows_the_model_and_autocast():
    """An fp32 model computes in fp32 (no silent bf16); inside autocast the GEMMs take its dtype."""
    torch.manual_seed(2)
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]))
    x = images_for(model, 2)
    ref = APM(model.config, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    want = ref(x.double(), backend="reference").cls
    assert rel_err(model(x, backend="torch").cls.double(), want) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, backend="torch").cls
    assert low.dtype == torch.float32 and 1e-5 < rel_err(low.double(), want) < 5e-2


def test_contract_names_the_argument():
    w = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, \*, 7\), got \(2, 3, 8\)"):
        TP.linear(torch.randn(2, 3, 8), w)
    with pytest.raises(ValueError, match="b: expected shape"):
        TP.linear(torch.randn(2, 3, 7), w, torch.randn(2, 6))
    with pytest.raises(TypeError, match="w: expected dtype"):
        TP.linear(torch.randn(2, 3, 7), w.to(torch.int32))
    with pytest.raises(ValueError, match="u: expected shape"):
        TP.first_layer_linear(torch.randn(2, 4, 6), torch.randn(2, 3, 5), torch.randn(2, 5, 6), None)
    with pytest.raises(ValueError, match="out: expected shape"):
        TP.linear_bwd_weight(torch.randn(2, 3, 5), torch.randn(2, 3, 7), out=torch.empty(2, 5, 6))
    with pytest.raises(ValueError, match="step: expected a one-element tensor"):
        TP.adam_(torch.randn(1, 7), torch.randn(1, 7), torch.randn(1, 7), torch.randn(1, 7), 1,
                 torch.ones(1), 0.9, 0.999, 1e-8)


def test_torch_compile_fullgraph_on_the_cpu_backends():
    """The model compiles as one graph on the CPU backends: the input checks (a host read) stay at
    the eager boundary and the position codes are computed in the graph."""
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", grid=4, patch=2, hidden=(16, 12), dim=8, heads=2))
    x = torch.randn(2, 3, 8, 8)
    for backend in ("reference", "torch"):
        torch._dynamo.reset()
        fn = torch.compile(lambda im: model(im, backend=backend).cls, fullgraph=True, backend="eager")
        torch.testing.assert_close(fn(x), model(x, backend=backend).cls)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_replayed_inference_forward_equals_the_autograd_forward(device):
    """Inference on a GPU replays a captured forward from the second call with the same shape on
    (graphs=True: from the first; on the CPU the same function runs eagerly): equal outputs,
    fresh tensors, the model's in-place weight updates seen; a forward that records gradients
    never replays."""
    from apm_fast.backends import get_backend
    from apm_fast.ops import autograd, release_graphs
    from apm_fast.ops.autograd import fused_forward

    release_graphs()
    torch.manual_seed(13)
    dt = torch.float64 if device == "cpu" else torch.float32
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), dtype=dt, device=device)
    x = images_for(model, 3).to(device)
    prim = get_backend("torch", device=device)
    tol = 1e-12 if device == "cpu" else 1e-5
    auto = device == "cuda"
    with torch.no_grad():
        plain = fused_forward(prim, model, x, dt, graphs=False)
        firsts = [fused_forward(prim, model, x, dt, graphs=None if auto else True) for _ in range(3)]
    assert len(autograd._FORWARD) == 1
    (kept,) = autograd._FORWARD.values()
    assert (kept.graph is not None) == auto
    for cls, grid in firsts:
        assert rel_err(cls, plain[0]) < tol and rel_err(grid, plain[1]) < tol
    firsts[1][1].zero_()                                      # outputs are the caller's own
    assert rel_err(firsts[2][1], plain[1]) < tol
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.8)
        moved = fused_forward(prim, model, x, dt, graphs=None if auto else True)
        again = fused_forward(prim, model, x, dt, graphs=False)
    assert next(iter(autograd._FORWARD.values())) is kept
    assert rel_err(moved[0], again[0]) < tol and rel_err(moved[0], plain[0]) > 1e-3
    release_graphs()
    cls, _ = fused_forward(prim, model, x, dt, graphs=True)   # gradients recorded: never replayed
    assert cls.requires_grad and not autograd._FORWARD


def test_the_model_forward_keeps_the_first_layer_activation_only_for_a_backward(monkeypatch):
    """A table that keeps the first layer's activation (``first_layer_act_kept``) writes it out
    for the model's forward only when a backward follows (no copy in an inference call), and
    its gradients are the ones of the activation built where it is read."""
    from apm_fast.ops.autograd import fused_forward

    torch.manual_seed(14)
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), dtype=torch.float64)
    x = images_for(model, 2)
    calls, real = [], TorchPrimitives.first_layer_act
    monkeypatch.setattr(TorchPrimitives, "first_layer_act", lambda self, p, u: (calls.append(1), real(self, p, u))[1])

    def grads(kept):
        monkeypatch.setattr(TorchPrimitives, "first_layer_act_kept", kept, raising=False)
        model.zero_grad()
        cls, grid = fused_forward(TorchPrimitives(), model, x, torch.float64)
        (cls.square().sum() + grid.sum()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    monkeypatch.setattr(TorchPrimitives, "first_layer_act_kept", True, raising=False)
    with torch.no_grad():
        fused_forward(TorchPrimitives(), model, x, torch.float64, graphs=False)
    assert calls == []
    kept = grads(True)
    assert calls == [1]
    rebuilt = grads(False)
    assert calls == [1] and len(kept) == len(rebuilt) > 10
    for a, b in zip(kept, rebuilt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_kept_graphs_serve_concurrent_callers_one_at_a_time():
    """Threads sharing the kept chunk and the kept forward (their static inputs and outputs):
    every call gets its own images' result (KeptGraph.exclusive)."""
    import threading

    from apm_fast.ops import release_graphs
    from apm_fast.ops.autograd import fused_forward
    from apm_fast.ops.driver import columns, weight_names

    release_graphs()
    torch.manual_seed(14)
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), dtype=torch.float64)
    w = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters() if n in weight_names(model.config)}
    xs = [images_for(model, 2) * (1 + 0.3 * i) for i in range(4)]
    kw = dict(cdt=torch.float64, chunk=7, query_grid=7)
    with torch.no_grad():
        want = [(columns(TP, w, x, model.config, graphs=False, **kw)[0],
                 fused_forward(TP, model, x, torch.float64, graphs=False)[0]) for x in xs]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    cls = columns(TP, w, xs[i], model.config, graphs=True, **kw)[0]
                    z = fused_forward(TP, model, xs[i], torch.float64, graphs=True)[0]
                    if rel_err(cls, want[i][0]) > 1e-12 or rel_err(z, want[i][1]) > 1e-12:
                        errors.append(i)
        except Exception as exc:          # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_work_beside_the_gemms_gives_the_same_gradients_announced_in_order(device):
    """forward/backward with ``beside`` (the trigger, the pool's projections and parameter
    gradients and the conv's gradients on a second CUDA stream and, with
    ``wgrad_beside``, the weight gradients on a third; without it, after the input gradients)
    give what they give
    without it, and every ``on_done`` announcement comes after its gradients are written on the
    stream it is made on: a copy taken there at that moment equals the final gradient (the
    gradients start as NaN). On the CPU ``beside`` changes nothing."""
    from apm_fast.ops.driver import backward, forward, weight_names
    from apm_fast.posenc import position_code

    torch.manual_seed(5)
    model = APM(preset("ttt-l14", init="pytorch", **ODD_CONFIGS[0]), device=device)
    c, names = model.config, weight_names(model.config)
    params = dict(model.named_parameters())
    w = {n: torch.stack([params[n].detach(), 1.1 * params[n].detach()]) for n in names}   # S = 2
    x = images_for(model, 2).to(device)[:, None]
    pos_in = position_code(c.pos_dim, c.grid, c.grid, device=device)
    pos_out = position_code(c.dim, c.grid, c.grid, device=device)

    def run(beside, wgrad_beside=True):
        grads = {n: torch.full_like(w[n], float("nan")) for n in names}
        seen = {}

        def on_done(done):              # enqueued on the announcing stream, after what it waits for
            seen.update({n: grads[n].clone() for n in done})

        z, f, ctx = forward(TP, w, x, c, pos_in, pos_out, cdt=torch.float32, beside=beside)
        backward(TP, w, ctx, torch.cos(z), c, pos_in, pos_out, grad_out=grads, on_done=on_done,
                 beside=beside, wgrad_beside=wgrad_beside, release=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return z, grads, seen

    z0, g0, seen0 = run(False)
    assert sorted(seen0) == sorted(names)
    for wgrad_beside in (True, False):
        z1, g1, seen1 = run(True, wgrad_beside)
        assert sorted(seen1) == sorted(names)
        assert rel_err(z1, z0) < 1e-6
        for n in names:
            assert torch.isfinite(g1[n]).all(), n
            assert rel_err(g1[n], g0[n]) < 1e-6, n
            assert torch.equal(seen1[n], g1[n]), f"{n} was announced before its gradient was written"


@pytest.mark.parametrize("b", [1, 3])
def test_several_students_equal_each_alone_f64(b):
    """Several students take other code paths than one (the pool's per-head products and outer
    sums as one product per student against block-diagonal rows): every student's output and
    gradients equal what it gets alone, in float64, with one image or several."""
    from apm_fast.ops.driver import backward, forward, weight_names
    from apm_fast.posenc import position_code

    torch.manual_seed(0)
    model = APM(preset("ttt-l14", grid=4, patch=2, hidden=(16, 12), dim=16, heads=4, init="pytorch")).double()
    c, names = model.config, weight_names(model.config)
    params = dict(model.named_parameters())
    pos_in = position_code(c.pos_dim, c.grid, c.grid, dtype=torch.float64)
    pos_out = position_code(c.dim, c.grid, c.grid, dtype=torch.float64)
    scales = [1.0, 1.1, 0.9]
    x = torch.randn(len(scales), b, 3, c.image_size, c.image_size, dtype=torch.float64)

    def run(idx):
        w = {n: torch.stack([scales[i] * params[n].detach() for i in idx]) for n in names}
        z, _, ctx = forward(TP, w, x[idx], c, pos_in, pos_out, cdt=torch.float64)
        return z, backward(TP, w, ctx, torch.cos(z), c, pos_in, pos_out)

    z_all, g_all = run([0, 1, 2])
    for i in range(len(scales)):
        z1, g1 = run([i])
        assert rel_err(z_all[i], z1[0]) < 1e-12
        for n in names:
            assert rel_err(g_all[n][i], g1[n][0]) < 1e-12, (n, i)


@pytest.mark.parametrize("students, b", [(1, 1), (3, 2)])
def test_forward_gives_alpha_z_minus_target_from_the_output_product(students, b):
    """forward(..., minus=t, alpha=a) gives a (z - t) in z's place (the TTT step's loss gradient),
    with one image a student or several (the start broadcast over them), in float64; the rest of
    the forward (f, the ctx's o) is the plain forward's."""
    from apm_fast.ops.driver import forward
    from apm_fast.posenc import position_code

    torch.manual_seed(1)
    model = APM(preset("ttt-l14", grid=4, patch=2, hidden=(16, 12), dim=16, heads=4, init="pytorch")).double()
    c = model.config
    w = {n: torch.stack([p.detach() * (1 + 0.1 * i) for i in range(students)]) for n, p in model.named_parameters()}
    pos_in = position_code(c.pos_dim, c.grid, c.grid, dtype=torch.float64)
    pos_out = position_code(c.dim, c.grid, c.grid, dtype=torch.float64)
    x = torch.randn(students, b, 3, c.image_size, c.image_size, dtype=torch.float64)
    t = torch.randn(students, c.dim, dtype=torch.float64)
    z, f, ctx = forward(TP, w, x, c, pos_in, pos_out, cdt=torch.float64)
    dz, f2, ctx2 = forward(TP, w, x, c, pos_in, pos_out, cdt=torch.float64, minus=t, alpha=2.0 / c.dim)
    assert dz.shape == z.shape == (students, b, c.dim)
    assert rel_err(dz, (z - t[:, None]) * (2.0 / c.dim)) < 1e-13
    assert torch.equal(f2, f) and torch.equal(ctx2.o, ctx.o)


@pytest.mark.parametrize("d, height, width", [(24, 4, 6), (25, 5, 5), (2, 3, 4)])
def test_position_products_from_the_codes_halves(d, height, width):
    """P = pos W_P^T and dW_P = g1^T pos computed from the code's two halves (pos_grid) equal the
    one-GEMM forms in float64 (trimmed widths and a code with no y half included); in bf16 they
    are no further from the float64 values than the one-GEMM forms; a pos_in that is not the
    grid's is refused by name."""
    from apm_fast.ops.driver import position_product, position_weight_grad
    from apm_fast.posenc import position_code

    torch.manual_seed(3)
    s, h1, L = 2, 16, height * width
    wp, g1 = torch.randn(s, h1, d, dtype=torch.float64), torch.randn(s, L, h1, dtype=torch.float64)
    pos = position_code(d, height, width, dtype=torch.float64)
    exact_p, exact_dw = torch.einsum("ld,shd->slh", pos, wp), torch.einsum("slh,ld->shd", g1, pos)
    grid = (height, width)
    assert rel_err(position_product(TP, wp, pos, torch.float64, grid=grid), exact_p) < 1e-14
    assert rel_err(position_weight_grad(TP, g1, pos, grid=grid), exact_dw) < 1e-14
    out = torch.zeros(s, h1, 2 * d, dtype=torch.float64)[:, :, d:]         # a column block, written in place
    assert position_weight_grad(TP, g1, pos, grid=grid, out=out) is out and rel_err(out, exact_dw) < 1e-14
    # bf16: the errors of both forms against the float64 products of the same rounded operands
    bf = torch.bfloat16
    pos16, wp16, g16 = position_code(d, height, width, dtype=bf), wp.to(bf), g1.to(bf)
    ref_p = torch.einsum("ld,shd->slh", pos, wp16.double())
    ref_dw = torch.einsum("slh,ld->shd", g16.double(), pos)
    errs = {k: (rel_err(position_product(TP, wp16, pos16, bf, grid=k).double(), ref_p),
                rel_err(position_weight_grad(TP, g16, pos16, grid=k).double(), ref_dw)) for k in (None, grid)}
    halves, gemm = errs[grid], errs[None]
    assert 0 < halves[0] < 1.1 * gemm[0] and 0 < halves[1] < 1.1 * gemm[1], errs
    with pytest.raises(ValueError, match="pos_grid"):
        position_product(TP, wp, pos[:-1], torch.float64, grid=grid)


def test_fp32_convolutions_on_a_gpu_are_not_tf32_inside_the_plain_forward(monkeypatch):
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default; the plain forward (the
    reference, the RGB head) and the reference trainer turn that off on a CUDA device only, and
    put the user's setting back afterwards."""
    from apm_fast.ops.precision import exact_convolutions

    cudnn = torch.backends.cudnn
    assert cudnn.allow_tf32            # PyTorch's default
    with exact_convolutions(torch.device("cuda")):
        assert not cudnn.allow_tf32
    assert cudnn.allow_tf32
    with exact_convolutions(torch.device("cpu")):
        assert cudnn.allow_tf32        # nothing to change on the CPU
    seen = []
    import apm_fast.model as model_module

    real = model_module.exact_convolutions
    monkeypatch.setattr(model_module, "exact_convolutions", lambda d: (seen.append(torch.device(d).type), real(d))[1])
    model = APM(preset("ssl-l14", grid=4, patch=2, hidden=(16, 12, 8, 8, 8), dim=8))
    model(torch.randn(1, 3, 8, 8), backend="reference")
    model(torch.randn(1, 3, 8, 8), backend="torch")          # the RGB head's trigger
    assert seen == ["cpu", "cpu"]


@pytest.mark.gpu
def test_gpu_an_fp32_model_matches_float64_by_default():
    """On a GPU, with PyTorch's default flags, an fp32 model's forward (cls, grid, RGB) on the plain
    backends and an fp32 reference training match float64 to fp32 round-off: no TF32, no bf16."""
    from apm_fast import TestTimeTrainer

    torch.manual_seed(3)
    dev = torch.device("cuda")
    for cfg in (preset("ttt-l14", grid=8, patch=14, hidden=(256, 128), dim=64, heads=8),
                preset("ssl-l14", grid=8, patch=14, hidden=(128, 96, 64, 64, 64), dim=64)):
        model = APM(cfg, device=dev)
        ref = APM(cfg, dtype=torch.float64, device=dev)
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        x = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=dev)
        want = ref(x.double(), backend="reference")
        for backend in ("reference", "torch"):
            got = model(x, backend=backend)
            for name in ("cls", "grid", "rgb"):
                a, b = getattr(got, name), getattr(want, name)
                if b is not None:
                    assert a.dtype == torch.float32 and rel_err(a.double(), b) < 1e-5, (cfg.pool, backend, name)
        if cfg.pool:
            y = torch.randn(2, cfg.dim, device=dev)
            kw = dict(steps=3, lr=1e-3, backend="reference")
            a = TestTimeTrainer(model, **kw).fit(x, y).cls
            b = TestTimeTrainer(ref, **kw).fit(x.double(), y.double()).cls
            assert rel_err(a.double(), b) < 1e-4
