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
