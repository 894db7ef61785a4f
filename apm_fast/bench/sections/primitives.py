"""(f) Every primitive of every table on the real operands of one preset's step.

The operands come from one forward and backward of the driver (``primitives_preset``, S = 1, B
images per student for every B of ``primitive_batches``). Each primitive of each available table
is first checked against the torch table (the contract's oracle) computed in fp32 on the same
operands (relative Frobenius error), then timed in a CUDA graph of 5 calls (launch overheads do
not count). The torch table's GEMMs are cuBLAS (``bmm`` with an fp32 result for 16-bit operands),
so every row's ``vs_best`` says how far the table is from the best of cuBLAS and the kernels.
"""
from __future__ import annotations

import math

import torch

from ...backends import get_backend
from ...ops.contract import TorchPrimitives
from ...ops.driver import forward, weight_names
from ...posenc import position_code
from ..gate import relative_error
from ..timing import measure_graph

__all__ = ["run", "NAME"]

NAME = "primitives"
_ORACLE = TorchPrimitives()
_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def _operands(ctx, cfg, b, cdt):
    """Weights and saved activations of one driver forward/backward at B images (S = 1)."""
    model = ctx.model(ctx.options.primitives_preset)
    params = dict(model.named_parameters())
    w = {n: params[n].detach().unsqueeze(0) for n in weight_names(cfg)}
    w = {n: (v.to(cdt) if n.startswith(("mlp.", "head.")) else v) for n, v in w.items()}
    images = ctx.images(ctx.options.primitives_preset, b).unsqueeze(0)
    pos_in = position_code(cfg.pos_dim, cfg.grid, cfg.grid, dtype=cdt, device=ctx.device)
    pos_out = position_code(cfg.dim, cfg.grid, cfg.grid, dtype=cdt, device=ctx.device)
    with torch.no_grad():
        _, f, fctx = forward(_ORACLE, w, images, cfg, pos_in, pos_out, cdt=cdt)
    return w, fctx, pos_in, pos_out


def _cases(cfg, w, fctx, pos_in, pos_out, cdt):
    """(name, flops or bytes, unit, call(table)) for every primitive of one step."""
    gen = torch.Generator(device=fctx.p.device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=fctx.p.device).to(cdt)   # noqa: E731
    L, s = pos_in.shape[0], 1
    b = fctx.u.shape[1]
    m = b * L
    layers = [(w[f"mlp.{i}.weight"], w[f"mlp.{i}.bias"]) for i in range(1, len(cfg.hidden))]
    layers.append((w["head.weight"], w["head.bias"]))
    wp = w["mlp.0.weight"][:, :, cfg.pos_dim:].to(cdt)
    h1 = cfg.hidden[0]
    out = [("linear P (shared pos)", 2 * L * cfg.pos_dim * h1, "TFLOP/s",
            lambda t: t.linear(pos_in, wp, None, out_dtype=cdt)),
           ("first_layer_linear", 2 * m * h1 * layers[0][0].shape[1], "TFLOP/s",
            lambda t: t.first_layer_linear(fctx.p, fctx.u, *layers[0], relu=True, out_dtype=cdt))]
    for i, (wk, bk) in enumerate(layers[1:], start=1):
        x = fctx.acts[i]
        relu = i < len(layers) - 1
        n, k = wk.shape[1:]
        out.append((f"linear {n}x{k}", 2 * m * n * k, "TFLOP/s",
                    lambda t, x=x, wk=wk, bk=bk, relu=relu: t.linear(x, wk, bk, relu=relu, out_dtype=cdt)))
        dy = rnd(s, m, n)
        out.append((f"linear_bwd_input {n}x{k}", 2 * m * n * k, "TFLOP/s",
                    lambda t, dy=dy, wk=wk, x=x: t.linear_bwd_input(dy, wk, mask=x, out_dtype=cdt)))
        out.append((f"linear_bwd_weight {n}x{k}", 2 * m * n * k, "TFLOP/s",
                    lambda t, dy=dy, x=x: t.linear_bwd_weight(dy, x)))
    w2 = layers[0][0]
    esz = torch.finfo(cdt).bits // 8
    out.append(("first_layer_act", (L + m) * h1 * esz, "GB/s", lambda t: t.first_layer_act(fctx.p, fctx.u)))
    dy2 = rnd(s, m, w2.shape[1])
    out.append(("first_layer_bwd_input", 2 * m * w2.shape[1] * h1, "TFLOP/s",
                lambda t: t.first_layer_bwd_input(dy2, w2, fctx.p, fctx.u, out_dtype=cdt)))
    out.append(("first_layer_bwd_weight", 2 * m * w2.shape[1] * h1, "TFLOP/s",
                lambda t: t.first_layer_bwd_weight(dy2, fctx.p, fctx.u)))
    g1 = rnd(s, L, h1)
    out.append(("linear_bwd_weight dW_P (shared pos)", 2 * L * h1 * cfg.pos_dim, "TFLOP/s",
                lambda t: t.linear_bwd_weight(g1, pos_in, bias=False)))
    if cfg.pool:
        scale = 1.0 / math.sqrt(cfg.head_dim)
        out.append(("pool_fwd", 2 * m * cfg.dim * esz, "GB/s",
                    lambda t: t.pool_fwd(fctx.f, pos_out, fctx.kt, scale)))
        dsbar = torch.randn_like(fctx.sbar)
        out.append(("pool_bwd", 3 * m * cfg.dim * esz, "GB/s",
                    lambda t: t.pool_bwd(fctx.f, pos_out, fctx.kt, scale, fctx.sbar, fctx.lse, dsbar, out_dtype=cdt)))
        # the per-head products on one third of the in-projection (fp32, as the driver reads it):
        # the query's key (q's heads) and the value projection of the weighted sums (B images)
        acc = fctx.sbar.dtype
        thirds = w["attn.in_proj_weight"].to(acc).chunk(3, dim=1)
        q_h = fctx.q.view(s, 1, cfg.heads, cfg.head_dim)
        wbytes = cfg.dim * cfg.dim * torch.finfo(acc).bits // 8
        out.append(("heads_product x_h w_h (key)", wbytes, "GB/s",
                    lambda t: t.heads_product(q_h, thirds[1])))
        out.append(("heads_product w_h x_h (value)", wbytes, "GB/s",
                    lambda t: t.heads_product(fctx.sbar, thirds[2], transpose=True)))
    return out


def _adam_cases(cfg, device, cdt):
    """Adam over one student's flat buffers with the compute copy (30 B per parameter moved), and
    over the first layer's trigger columns with the gradient from its factors (a block of columns
    of the weight, one image: 26 B per parameter, no gradient read)."""
    from ...ttt.memory import count_params

    n = count_params(cfg)
    p, g = torch.randn(1, n, device=device), torch.randn(1, n, device=device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    lowp = torch.empty(1, n, device=device, dtype=cdt)
    # a later update (19 of a batch's 20): at step 1 the Triton and cuda tables read no moments
    # (``adam_fresh_at_step_one``), 8 B a parameter less than the bytes these rows are rated by
    step, lr = torch.full((1,), 2.0, device=device), torch.full((1,), 1e-4, device=device)
    rows, d = cfg.hidden[0], cfg.pos_dim
    block = [t[:, :rows * 2 * d].view(1, rows, 2 * d)[:, :, :d] for t in (p, m, v, lowp)]
    factors = (torch.randn(1, 1, rows, device=device), torch.randn(1, 1, d, device=device))

    def flat(t):
        t.adam_(p, g, m, v, step, lr, 0.9, 0.999, 1e-8, lowp=lowp)
        return p

    def trigger(t):
        t.adam_(block[0], None, block[1], block[2], step, lr, 0.9, 0.999, 1e-8, lowp=block[3], outer=factors)
        return p

    def checked(update):
        """What one update does, for the check against the plain table's: the step it took (which
        the moments' update decides), the buffers put back as they were."""
        def run(t):
            saved = [x.clone() for x in (p, m, v, lowp)]
            update(t)
            out = (p - saved[0]) / lr
            for x, s in zip((p, m, v, lowp), saved):
                x.copy_(s)
            return out
        return run

    return [("adam_ (flat, + compute copy)", 30 * n, "GB/s", flat, checked(flat)),
            ("adam_ (trigger columns from factors)", 26 * rows * d, "GB/s", trigger, checked(trigger))]


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def run(ctx) -> dict:
    o = ctx.options
    cdt = ctx.amp_dtype or torch.float32
    cfg = ctx.options.config(o.primitives_preset)
    tables = [(n, get_backend(n, device=ctx.device)) for n, st in ctx.backends.items()
              if n != "reference" and st == "available" and not ctx.skipped(n)]
    rows = []
    for b in o.primitive_batches:
        w, fctx, pos_in, pos_out = _operands(ctx, cfg, b, cdt)
        cases = _cases(cfg, w, fctx, pos_in, pos_out, cdt) + (_adam_cases(cfg, ctx.device, cdt) if b == 1 else [])
        for name, work, unit, call, *check in cases:
            check = check[0] if check else call      # what is compared with the plain table's result
            with torch.no_grad():
                want = _first(check(_ORACLE)).float()
            group = []
            for tname, table in tables:
                base = {"primitive": name, "batch": b, "backend": tname, "key": f"{name}/B={b}/{tname}",
                        "unit": unit, "precision": str(cdt).replace("torch.", "")}

                def measure(table=table, check=check):
                    with torch.no_grad():
                        err = relative_error(_first(check(table)), want)
                    if not err <= _TOL[cdt]:
                        raise AssertionError(f"wrong result: relative error {err:.3g} > {_TOL[cdt]:.0e}")
                    with torch.no_grad():
                        t = measure_graph(lambda: call(table), device=ctx.device, repeats=o.repeats)
                    rate = work / (t.median_ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
                    return {"timing": t.to_dict(), "rate": rate, "rel_err": err}

                group.append(ctx.row(base, "available", tname, measure))
            ok = [r for r in group if r["status"] == "ok"]
            best = min((r["timing"]["median_ms"] for r in ok), default=None)
            for r in ok:
                r["vs_best"] = r["timing"]["median_ms"] / best
            rows += group
        del w, fctx
    return {"rows": rows, "preset": o.primitives_preset,
            "columns": [("primitive", "primitive"), ("B", "batch"), ("backend", "backend"),
                        ("ms", "timing.median_ms"), ("rate", "rate"), ("unit", "unit"),
                        ("x best", "vs_best"), ("rel err", "rel_err")]}
