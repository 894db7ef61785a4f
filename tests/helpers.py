"""Small configs and comparison helpers shared by the tests."""
import torch

from apm_fast import APM, preset

# Odd on purpose: grids that are not multiples of any tile, widths that are not powers of two,
# head counts that do not divide evenly into powers of two.
ODD_CONFIGS = [
    dict(grid=5, patch=3, hidden=(37, 29, 23), dim=36, heads=4),
    dict(grid=7, patch=2, hidden=(50,), dim=20, heads=5),
    dict(grid=12, patch=2, hidden=(40, 33, 26, 19, 14), dim=28, heads=7),
]


def tiny_model(dtype=torch.float64, seed=0, init="pytorch", **over):
    """A small APM (pytorch init: weights big enough that every path carries signal)."""
    cfg = dict(ODD_CONFIGS[0])
    cfg.update(over)
    torch.manual_seed(seed)
    return APM(preset("ttt-l14", init=init, **cfg), dtype=dtype)


def images_for(model, n, seed=1, dtype=None):
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    return torch.randn(n, model.config.in_chans, s, s, generator=g, dtype=dtype or model.dtype)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def precision(name, device="cuda"):
    """The compute precision of a block: "fp32" (a float32 model's own) or "bf16"/"fp16" (torch's
    autocast, which the tables follow)."""
    import contextlib

    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[name])


def check_bf16_moment_adam(table, device, n=1001):
    """A table's Adam with bf16 moments (widened, updated in fp32, rounded once when stored) takes
    the plain table's steps (the oracle of the contract): moments within one bf16 ulp (Triton's
    interpreter truncates its casts, a GPU rounds to nearest as torch, after fp32 arithmetic that
    may differ in its last bit), parameters within what one ulp of a moment moves them. n odd:
    vectorized kernels also run their tails."""
    from apm_fast.ops.contract import TorchPrimitives

    gen = torch.Generator().manual_seed(9)
    p0 = torch.randn(2, n, generator=gen).to(device)
    ours = [p0.clone(), torch.zeros(2, n, device=device, dtype=torch.bfloat16),
            torch.zeros(2, n, device=device, dtype=torch.bfloat16)]
    ref = [t.clone() for t in ours]
    step = torch.zeros(1, device=device)
    lr = torch.full((1,), 3e-3, device=device)
    for _ in range(5):
        g = torch.randn(2, n, generator=gen).to(device)
        step += 1
        table.adam_(ours[0], g, ours[1], ours[2], step, lr, 0.9, 0.999, 1e-8)
        TorchPrimitives().adam_(ref[0], g, ref[1], ref[2], step, lr, 0.9, 0.999, 1e-8)
        assert ours[1].dtype == ours[2].dtype == torch.bfloat16
        ulp = 2 ** -7                          # one bf16 ulp, relative, at its widest
        torch.testing.assert_close(ours[1].float(), ref[1].float(), rtol=ulp, atol=1e-30)
        torch.testing.assert_close(ours[2].float(), ref[2].float(), rtol=ulp, atol=1e-30)
        # the moments stored differ by an ulp at most, and Adam divides m by sqrt(v): lr x 1 %
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=3e-3 * 2e-2)
        ours[1].copy_(ref[1])
        ours[2].copy_(ref[2])


# (S, rows, trigger columns, width) of check_block_adam: odd widths (rows are not 16-byte
# multiples: element by element), and widths whose rows all start 16-byte aligned (vectorized,
# with a tail of 2 in the position block's rows), and rows of whole 16-byte multiples (the CUDA
# kernel's rows laid end to end, its tiles' vector stores)
BLOCK_SHAPES = [(2, 37, 13, 30), (3, 21, 16, 38), (2, 37, 64, 128)]


def check_block_adam(table, device, moments=torch.float32, shape=BLOCK_SHAPES[0]):
    """A table's Adam over column blocks of a weight ((S, R, C) views with a row stride: the first
    layer's trigger and position columns) takes the plain table's steps over the whole weight with
    the gradient written out: the update is elementwise, so splitting it into blocks changes
    nothing but the launches. The first block's gradient is given by its factors (``outer``, rank
    2, each student's own: the trigger columns), the second's by factors of rank 17 (past the
    Triton table's 16, where it goes by tiles) whose second factor every student shares (a
    stride-0 view) and whose first is a slice of a larger tensor (the position columns from the
    code's halves), the rest is written out. With a bf16 copy."""
    from apm_fast.ops.contract import TorchPrimitives

    gen = torch.Generator().manual_seed(11)
    (s, r, c, w), k, k2 = shape, 2, 17
    c2 = c + (w - c) // 2
    p0 = torch.randn(s, r, w, generator=gen).to(device)
    ours = [p0.clone(), torch.zeros(s, r, w, device=device, dtype=moments),
            torch.zeros(s, r, w, device=device, dtype=moments),
            torch.full((s, r, w), float("nan"), device=device, dtype=torch.bfloat16)]
    ref = [t.clone() for t in ours]
    step = torch.zeros(1, device=device)
    lr = torch.full((1,), 3e-3, device=device)
    for _ in range(3):
        a = torch.randn(s, k, r, generator=gen).to(device)
        b = torch.randn(s, k, c, generator=gen).to(device)
        a2 = torch.randn(s, k2 + 3, r, generator=gen).to(device)[:, 2:2 + k2]
        b2 = torch.randn(k2, c2 - c, generator=gen).to(device).expand(s, k2, c2 - c)
        g = torch.randn(s, r, w, generator=gen).to(device)
        g[:, :, :c] = torch.bmm(a.transpose(1, 2), b)
        g[:, :, c:c2] = torch.bmm(a2.transpose(1, 2), b2)
        g[:, :, c2:] *= 10.0 ** torch.randint(-3, 3, (s, r, w - c2), generator=gen).to(device)
        step += 1
        blocks = [[t[:, :, cols] for t in ours] for cols in (slice(0, c), slice(c, c2), slice(c2, w))]
        for (pb, mb, vb, lb), outer in zip(blocks[:2], ((a, b), (a2, b2))):
            table.adam_(pb, None, mb, vb, step, lr, 0.9, 0.999, 1e-8, lowp=lb, outer=outer)
        table.adam_(blocks[2][0], g[:, :, c2:], blocks[2][1], blocks[2][2], step, lr, 0.9, 0.999, 1e-8,
                    lowp=blocks[2][3])
        flat = [t.view(s, -1) for t in ref]
        TorchPrimitives().adam_(flat[0], g.view(s, -1), flat[1], flat[2], step, lr, 0.9, 0.999, 1e-8, lowp=flat[3])
        # fp32 arithmetic in the same order but for the factors' sums (a few ulps of a gradient):
        # a few ulps; bf16 moments and the bf16 copy: two bf16 ulps (one for the interpreter's
        # truncation, one for values a few fp32 ulps apart rounding apart), and one ulp of a
        # moment moves the parameter by lr x 1 % at most
        tol = 1e-6 if moments == torch.float32 else 3e-3 * 2e-2
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=tol)
        for x, y in zip(ours[1:], ref[1:]):
            if x.dtype == torch.bfloat16:
                torch.testing.assert_close(x.float(), y.float(), rtol=2 * 2 ** -7, atol=1e-30)
            else:       # fp32 moments: a sum of 17 products that cancel is a few ulps of its terms off
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
        for x, y in zip(ours, ref):     # the next step from the same state (no drift of an ulp a step)
            x.copy_(y)
    assert not ours[3].float().isnan().any()


def check_fresh_adam(table, device, moments=torch.float32):
    """What a table's ``adam_fresh_at_step_one`` says holds: with it, the update at step 1 reads no
    moments (NaN-filled moments give, bit for bit, the update of zeroed ones: parameters, moments
    and the bf16 copy) and the next one reads them (NaN moments give NaN parameters); without it,
    the moments are read at step 1 too (the engine's reset must zero them). Over the flat buffer
    (odd: vectorized kernels also run their tails) and over column blocks whose gradients are
    given by factors of rank 2 (row by row) and 17 (by tiles where a table tiles)."""
    gen = torch.Generator().manual_seed(13)
    s, r, w = 2, 21, 38
    fresh = bool(table.adam_fresh_at_step_one)
    a = torch.randn(s, 2, r, generator=gen).to(device)
    b = torch.randn(s, 2, w, generator=gen).to(device)
    a2 = torch.randn(s, 17, r, generator=gen).to(device)
    b2 = torch.randn(s, 17, w, generator=gen).to(device)
    g = torch.randn(s, r * w, generator=gen).to(device)
    p0 = torch.randn(s, r, w, generator=gen).to(device)
    lr = torch.full((1,), 3e-3, device=device)
    for grads, outer in ((g, None), (None, (a, b)), (None, (a2, b2))):
        out = {}
        for fill in ("zeros", "nan"):
            for t in (1.0, 2.0):
                p = p0.clone()
                m = torch.full((s, r, w), 0.0 if fill == "zeros" else float("nan"), device=device, dtype=moments)
                v = m.clone()
                lowp = torch.zeros(s, r, w, device=device, dtype=torch.bfloat16)
                if grads is not None:
                    p, m, v, lowp = (x.view(s, -1) for x in (p, m, v, lowp))
                table.adam_(p, grads, m, v, torch.full((1,), t, device=device), lr, 0.9, 0.999, 1e-8,
                            lowp=lowp, outer=outer)
                out[fill, t] = (p, m, v, lowp)
        zeros, nans = out["zeros", 1.0], out["nan", 1.0]
        assert not any(x.float().isnan().any() for x in zeros)
        if fresh:
            for x, y in zip(nans, zeros):
                assert torch.equal(x, y), "step 1 read the moments"
        else:
            assert nans[0].isnan().all(), "a table that reads the moments at step 1 says it does not"
        assert out["nan", 2.0][0].isnan().all(), "step 2 did not read the moments"


def check_broadcast(table, device):
    """A table's ``broadcast_`` (the reset of S students to one snapshot): every student's copy
    equal to the snapshot bit for bit, the compute copy the snapshot rounded to bf16 (to nearest
    even as torch rounds; Triton's interpreter truncates: within one bf16 ulp there), over shapes
    that are not multiples of a block or of 16 bytes, a one-element parameter and 1-D and 2-D
    ones; bad arguments named."""
    import pytest

    gen = torch.Generator().manual_seed(19)
    for s, shape in ((3, (37, 29)), (2, (1,)), (5, (1500,)), (1, (4, 4))):
        src = torch.randn(*shape, generator=gen).to(device)
        dst = torch.full((s, *shape), float("nan"), device=device)
        lowp = torch.full((s, *shape), float("nan"), device=device, dtype=torch.bfloat16)
        table.broadcast_(dst, src, lowp=lowp)
        assert torch.equal(dst, src.expand_as(dst))
        want = src.to(torch.bfloat16).expand_as(lowp)
        if device == "cpu" and type(table).__name__ == "TritonPrimitives":
            torch.testing.assert_close(lowp.float(), want.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(lowp, want)
        again = torch.zeros_like(dst)
        table.broadcast_(again, src)                          # without a compute copy
        assert torch.equal(again, dst)
    dst = torch.zeros(2, 3, 4, device=device)
    with pytest.raises(TypeError, match="src"):
        table.broadcast_(dst, torch.zeros(3, 4, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="src"):
        table.broadcast_(dst, torch.zeros(4, 3, device=device))
    with pytest.raises(ValueError, match="dst"):
        table.broadcast_(dst.transpose(1, 2), torch.zeros(4, 3, device=device))
    with pytest.raises(ValueError, match="lowp"):
        table.broadcast_(dst, torch.zeros(3, 4, device=device), lowp=torch.zeros(2, 3, device=device))
