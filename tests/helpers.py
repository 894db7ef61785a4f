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
