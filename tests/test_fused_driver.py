"""The fused driver (apm_fast.ops) with the plain primitive table equals the reference model,
outputs and every gradient, and its Adam primitive equals torch.optim.Adam."""
import pytest
import torch

from apm_fast.backends import register_backend
from apm_fast.backends.fused import FusedBackend
from apm_fast.ops import TorchPrimitives
from helpers import ODD_CONFIGS, images_for, rel_err
from apm_fast import APM, preset

register_backend(FusedBackend("fused-torch-test", TorchPrimitives()))


@pytest.mark.parametrize("cfg", ODD_CONFIGS, ids=lambda c: f"grid{c['grid']}")
def test_fused_driver_matches_reference_f64(cfg):
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", init="pytorch", rgb_head=True, **cfg), dtype=torch.float64)
    x = images_for(model, 2)
    res = {}
    for backend in ("reference", "fused-torch-test"):
        model.zero_grad(set_to_none=True)
        out = model(x, backend=backend)
        (out.cls.square().sum() + out.grid.sin().sum() + out.rgb.sum()).backward()
        res[backend] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
    (a, ga), (b, gb) = res["reference"], res["fused-torch-test"]
    assert rel_err(b.cls, a.cls) < 1e-12 and rel_err(b.grid, a.grid) < 1e-12 and rel_err(b.rgb, a.rgb) < 1e-12
    d = cfg["dim"]
    for n in ga:
        x_ref, x_new = ga[n], gb[n]
        if n == "attn.in_proj_bias":  # the key bias's gradient is zero (it cancels in the softmax)
            assert x_new[d:2 * d].abs().max() == 0 and x_ref[d:2 * d].abs().max() < 1e-12
            x_ref, x_new = x_ref[torch.arange(3 * d) // d != 1], x_new[torch.arange(3 * d) // d != 1]
        assert rel_err(x_new, x_ref) < 1e-10, n


def test_adam_primitive_matches_torch_adam():
    torch.manual_seed(0)
    S, N, lr = 3, 37, 1e-2
    p = torch.randn(S, N, dtype=torch.float64)
    ref = [torch.nn.Parameter(p[i].clone()) for i in range(S)]
    opt = torch.optim.Adam(ref, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    low = torch.full((S, N), float("nan"), dtype=torch.bfloat16)
    step, lr_t = torch.zeros(1), torch.tensor([lr], dtype=torch.float64)
    prim = TorchPrimitives()
    for _ in range(6):
        g = torch.randn(S, N, dtype=torch.float64)
        for i in range(S):
            ref[i].grad = g[i].clone()
        opt.step()
        step += 1
        prim.adam_(p, g, m, v, step, lr_t, 0.9, 0.999, 1e-8, lowp=low)
    for i in range(S):
        assert rel_err(p[i], ref[i].detach()) < 1e-14
    assert torch.equal(low, p.to(torch.bfloat16))
