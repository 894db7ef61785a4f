"""The plain (reference) and rewritten (torch) forms compute the same function (spec section 3)."""
import math

import pytest
import torch

from apm_fast import APM, preset, position_code
from helpers import ODD_CONFIGS, images_for, rel_err, tiny_model

# float64 on both sides: the two forms differ only in summation order, so agreement is at the
# level of a few ulps of the largest intermediate; 1e-12 leaves room for the long (L-term) sums.
F64_TOL = 1e-12


@pytest.mark.parametrize("cfg", ODD_CONFIGS, ids=lambda c: f"grid{c['grid']}")
@pytest.mark.parametrize("rgb", [False, True])
def test_forward_reference_vs_torch_f64(cfg, rgb):
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", init="pytorch", rgb_head=rgb, **cfg), dtype=torch.float64)
    x = images_for(model, 3)
    a = model(x, backend="reference")
    b = model(x, backend="torch")
    L = cfg["grid"] ** 2
    assert a.cls.shape == (3, cfg["dim"]) and a.grid.shape == (3, L, cfg["dim"])
    assert rel_err(b.cls, a.cls) < F64_TOL
    assert rel_err(b.grid, a.grid) < F64_TOL
    if rgb:
        assert a.rgb.shape == (3, L, 3)
        assert rel_err(b.rgb, a.rgb) < F64_TOL
    else:
        assert a.rgb is None and b.rgb is None


@pytest.mark.parametrize("cfg", ODD_CONFIGS[:2], ids=lambda c: f"grid{c['grid']}")
def test_gradients_reference_vs_torch_f64(cfg):
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", init="pytorch", rgb_head=True, **cfg), dtype=torch.float64)
    x = images_for(model, 2).requires_grad_(True)
    weights = torch.randn(2, cfg["dim"], dtype=torch.float64)
    grads = {}
    for backend in ("reference", "torch"):
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = model(x, backend=backend)
        loss = (out.cls * weights).sum() + out.grid.tanh().sum() + out.rgb.square().sum()
        loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads[backend]["images"] = x.grad.clone()       # the images' gradient too (saliency)
    for name, g_ref in grads["reference"].items():
        g = grads["torch"][name]
        if name == "attn.in_proj_bias":
            # the key bias cancels in the softmax: its gradient is exactly zero in the plain form
            # up to round-off, and the rewrite never touches it
            d = cfg["dim"]
            assert g_ref[d:2 * d].abs().max() < 1e-12
            g_ref, g = torch.cat([g_ref[:d], g_ref[2 * d:]]), torch.cat([g[:d], g[2 * d:]])
        assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("pool", [True, False])
def test_the_images_gradient_of_a_frozen_model_on_a_table(pool):
    """Only the images require a gradient (a saliency map of a frozen model): the table's
    backward gives it, equal to the plain form's, in the images' dtype."""
    torch.manual_seed(1)
    model = tiny_model(pool=pool).requires_grad_(False)
    x = images_for(model, 2).requires_grad_(True)
    got = {}
    for backend in ("reference", "torch"):
        x.grad = None
        out = model(x, backend=backend)
        ((out.cls.sum() if pool else 0) + out.grid.sin().sum()).backward()
        got[backend] = x.grad
    assert got["torch"] is not None and got["torch"].dtype == x.dtype and got["torch"].shape == x.shape
    assert got["reference"].abs().max() > 0
    assert rel_err(got["torch"], got["reference"]) < 1e-10


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_inputs_of_another_dtype_are_cast_and_outputs_come_in_the_models(backend):
    """Every backend casts the images to the model's dtype and answers in it, under autocast
    too (the plain form's modules would otherwise refuse float64 images for a float32 model)."""
    model = tiny_model(dtype=torch.float32)
    x = images_for(model, 2, dtype=torch.float64)
    out = model(x, backend=backend)
    want = model(x.float(), backend=backend)
    assert out.cls.dtype == out.grid.dtype == torch.float32
    assert torch.equal(out.cls, want.cls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x.float(), backend=backend)
    assert low.cls.dtype == low.grid.dtype == torch.float32


def test_no_pool_model_gives_grid_only():
    model = tiny_model(pool=False, rgb_head=True)
    out = model(images_for(model, 1), backend="torch")
    assert out.cls is None and out.grid.shape[1] == 25 and out.rgb.shape == (1, 25, 3)
    assert model.attn is None and model.query is None


def test_position_code_matches_spec_formula():
    d, g = 16, 3
    code = position_code(d, g, g, dtype=torch.float64)
    half = d // 2
    for y in range(g):
        for x in range(g):
            row = code[y * g + x]
            for k in range(half // 2):
                freq = math.exp(-2 * k * math.log(10000.0) / half)
                assert row[2 * k].item() == pytest.approx(math.sin(x * freq), abs=1e-15)
                assert row[2 * k + 1].item() == pytest.approx(math.cos(x * freq), abs=1e-15)
                assert row[half + 2 * k].item() == pytest.approx(math.sin(y * freq), abs=1e-15)
                assert row[half + 2 * k + 1].item() == pytest.approx(math.cos(y * freq), abs=1e-15)


def test_position_code_odd_width_is_prefix_of_next_multiple_of_4():
    assert torch.equal(position_code(25, 5, 5, dtype=torch.float64),
                       position_code(28, 5, 5, dtype=torch.float64)[:, :25])


@pytest.mark.parametrize("d, height, width", [(24, 4, 6), (25, 5, 5), (2, 3, 4), (1024, 32, 32)])
def test_position_code_is_separable_bit_for_bit(d, height, width):
    """Row y * width + x of the code is [X[x] | Y[y]] (its halves), so the code is E C exactly,
    and position_cells rebuilds any rows from the halves (trimmed widths and no y half included)."""
    from apm_fast.posenc import position_cells, position_factors, position_halves

    code = position_code(d, height, width, dtype=torch.float64)
    xs, ys = position_halves(d, height, width, dtype=torch.float64)
    assert xs.shape[0] == width and ys.shape[0] == height and xs.shape[1] + ys.shape[1] == d
    cells = torch.arange(height * width)
    assert torch.equal(torch.cat([xs[cells % width], ys[cells // width]], dim=1), code)
    assert torch.equal(position_cells(d, height, width, cells.flip(0), dtype=torch.float64), code.flip(0))
    c, e = position_factors(d, height, width, dtype=torch.float64)
    assert torch.equal(e @ c, code)
    c2, e2 = position_factors(d, height, width, terms=2, dtype=torch.float64)
    assert torch.equal(c2, torch.cat([c, c])) and torch.equal(e2, torch.cat([e, e], dim=1))


def test_presets_and_overrides():
    c = preset("ttt-l14")
    assert (c.grid, c.patch, c.hidden, c.dim, c.heads, c.pool, c.rgb_head) == (32, 14, (4096, 2048, 1024), 768, 8, True, False)
    assert preset("ttt-b16").dim == 512 and preset("ttt-h14").dim == 1024
    s = preset("ssl-l14")
    assert s.hidden == (4096, 4096, 4096, 2048, 1024) and s.rgb_head and not s.pool
    o = preset("ttt-b16", grid=8, hidden=[64, 32])
    assert o.grid == 8 and o.hidden == (64, 32) and o.image_size == 8 * 14
    m = APM(preset("ttt-l14"))
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(22.0e6, rel=0.01)


@pytest.mark.parametrize("call, match", [
    (lambda: preset("ttt-xx"), "unknown name 'ttt-xx'"),
    (lambda: preset("ttt-l14", widths=(3,)), "unknown override"),
    (lambda: preset("ttt-l14", dim=30, heads=8), "heads"),
    (lambda: preset("ttt-l14", grid=0), "grid: expected a positive integer"),
    (lambda: preset("ttt-l14", hidden=()), "hidden"),
    (lambda: APM({"grid": 3}), "config: expected an APMConfig"),
])
def test_bad_config_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_authors_init_is_small_normal():
    torch.manual_seed(0)
    m = APM(preset("ttt-l14", grid=8, hidden=(300, 200)))
    for name, p in m.named_parameters():
        if p.numel() >= 100:   # the conv bias is a single number
            assert abs(p.std().item() - 0.01) < 0.004, name
    every = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert abs(every.std().item() - 0.01) < 1e-4 and abs(every.mean().item()) < 1e-4


def test_bad_images_errors():
    model = tiny_model()
    s = model.config.image_size
    with pytest.raises(ValueError, match=r"expected 15 x 15 pixels.*got 16 x 15"):
        model(torch.zeros(1, 3, 16, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 3 channels"):
        model(torch.zeros(1, 4, s, s, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 3, s, s, dtype=torch.float64))
    bad = torch.zeros(2, 3, s, s, dtype=torch.float64)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf.*first at index \(1, 2, 3, 4\)"):
        model(bad)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, s, s, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown name 'nope'"):
        model(torch.zeros(1, 3, s, s, dtype=torch.float64), backend="nope")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_under_autocast_the_rgb_head_answers_in_the_models_dtype(backend):
    """out.rgb comes in the model's dtype like cls and grid, inside an autocast region too."""
    model = tiny_model(dtype=torch.float32, rgb_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images_for(model, 2), backend=backend)
    assert out.cls.dtype == out.grid.dtype == out.rgb.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_only_an_fp32_model_takes_autocasts_dtype_on_every_backend(backend):
    """ops.precision's rule on the reference as on the tables: a bf16 model computes in bf16 under
    an fp16 autocast (the same output as without it, RGB head included), an fp32 model takes
    autocast's dtype."""
    low = tiny_model(dtype=torch.bfloat16, rgb_head=True)
    x = images_for(low, 2, dtype=torch.float32)
    plain = low(x, backend=backend)
    with torch.autocast("cpu", dtype=torch.float16):
        under = low(x, backend=backend)
    for a, b in zip((under.cls, under.grid, under.rgb), (plain.cls, plain.grid, plain.rgb)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    full = tiny_model(dtype=torch.float32, rgb_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taken = full(x, backend=backend)
    assert not torch.equal(taken.grid, full(x, backend=backend).grid)
