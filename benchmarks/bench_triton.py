"""Benchmark of the ``triton`` backend for one preset (default ``ttt-l14``), bf16, after a
correctness gate, against the ``torch`` backend eager and under ``torch.compile``, in one process.

    python benchmarks/bench_triton.py --out results/triton-h100

1. Gate: the model's pooled output and every gradient through the ``triton`` backend (fp32 mode and
   bf16) against the plain ``reference`` backend in float64, at the preset's real shapes (B = 1);
   one graph-captured TTT step against the same step run eagerly. Nothing is timed if it fails.
2. The measured bf16 GEMM ceiling (torch.matmul 8192^3).
3. Forward (all L queries + pool) at B = 1 and B = 64: triton eager and graph-replayed; the torch
   backend eager (bf16 autocast) and compiled.
4. Every primitive at B = 1 (and the forward GEMMs at B = 64): time in a CUDA graph of repeated
   calls (no launch overhead), achieved TFLOP/s (GB/s for the memory-bound ones).
5. One TTT step at B = 1 (forward + backward + Adam over one flat fp32 buffer refreshing the bf16
   copy): triton graph-replayed and eager; the torch backend eager (bf16 autocast, fused
   torch.optim.Adam) and compiled.
Writes ``bench_triton.json`` under ``--out`` and prints a table. Medians with p10/p90.

``--device cpu --tiny`` runs the same code paths on a tiny config in Triton's interpreter (no
graphs, no compile, fp32): a smoke test of this script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel is defined

import torch
import torch.nn.functional as F

from apm_fast import APM, preset
from apm_fast.backends.triton_backend import TritonPrimitives
from apm_fast.ops import backward_train, forward_train, precision, weight_names

TARGETS = {"forward_b1_ms": 0.15, "step_b1_graph_ms": 0.35, "forward_b64_ceiling_fraction": 0.60}


# ------------------------------------------------------------------------------------ timing
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def eager(self, fn, reps=30, warmup=3):
        """Wall time per call including the host's launch work (what eager code pays)."""
        for _ in range(warmup):
            fn()
        self._sync()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self._sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def graph(self, fn, inner=1, reps=30, warmup=2):
        """Device time per call: ``inner`` calls captured in one CUDA graph, replayed ``reps`` times."""
        if not self.cuda:
            return self.eager(fn, reps=max(3, reps // 10), warmup=1)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):        # autotuning and first allocations happen here
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        g.replay()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / inner)
        del g
        return out


def stats(ms):
    ms = sorted(ms)
    q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]   # noqa: E731
    return {"median_ms": statistics.median(ms), "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(ms)}


def machine(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    import triton
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": commit,
            "autotune": os.environ.get("APM_FAST_AUTOTUNE", "1"),
            "autotune_top": os.environ.get("APM_FAST_AUTOTUNE_TOP", "3")}


# ------------------------------------------------------------------------------------ the TTT step
class FlatStudent:
    """The weights of S students in one flat fp32 buffer (Adam's), a bf16 copy the GEMMs read, a
    flat fp32 gradient buffer, Adam's moments and the device-side step and lr."""

    def __init__(self, model, S=1, cdt=torch.bfloat16, lr=1e-4):
        cfg = model.config
        self.cfg, self.cdt = cfg, cdt
        self.names = weight_names(cfg)
        params = dict(model.named_parameters())
        shapes = [params[n].shape for n in self.names]
        sizes = [params[n].numel() for n in self.names]
        dev = params[self.names[0]].device
        self.flat = torch.cat([params[n].detach().float().reshape(-1) for n in self.names])[None].repeat(S, 1)
        self.lowp = self.flat.to(cdt)
        self.grad = torch.zeros_like(self.flat)
        self.m, self.v = torch.zeros_like(self.flat), torch.zeros_like(self.flat)
        self.step = torch.zeros(1, device=dev)
        self.lr = torch.full((1,), lr, device=dev)

        def views(buf):
            return {n: c.view(S, *sh) for n, c, sh in zip(self.names, buf.split(sizes, dim=1), shapes)}

        low, full = views(self.lowp), views(self.flat)
        # GEMM weights from the bf16 copy (read as is); the small per-image pieces in fp32
        gemm_w = {f"mlp.{i}.weight" for i in range(len(cfg.hidden))} | {"head.weight"}
        self.w = {n: (low[n] if n in gemm_w else full[n]) for n in self.names}
        self.g = views(self.grad)
        self.pos_in = model.pos_in(dtype=cdt)
        self.pos_out = model.pos_out(dtype=cdt)

    def forward(self, prim, images, save=False):
        return forward_train(prim, self.w, images, self.cfg, self.pos_in, self.pos_out, cdt=self.cdt, save=save)

    def train_step(self, prim, images, target):
        z, _, ctx = self.forward(prim, images, save=True)
        dz = (2.0 / (target.shape[1] * target.shape[2])) * (z - target)   # d mean((z - t)^2) / dz
        backward_train(prim, self.w, ctx, dz, self.cfg, self.pos_in, self.pos_out, grad_out=self.g)
        self.step.add_(1)
        prim.adam_(self.flat, self.grad, self.m, self.v, self.step, self.lr, 0.9, 0.999, 1e-8, lowp=self.lowp)


# ------------------------------------------------------------------------------------ gate
def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gate(cfg, device, cdt):
    """Relative errors of cls and every gradient vs the float64 reference; graph step vs eager."""
    torch.manual_seed(0)
    model = APM(cfg, dtype=torch.float32, device=device)
    ref = APM(cfg, dtype=torch.float64, device=device)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=device)
    target = torch.randn(1, cfg.dim, device=device) * 0.1

    def grads(m, backend, imgs):
        m.zero_grad(set_to_none=True)
        z = m(imgs, backend=backend, want_grid=False).cls
        F.mse_loss(z, target.to(z.dtype)).backward()
        return {"cls": z.detach(), **{n: p.grad.detach() for n, p in m.named_parameters()}}

    want = grads(ref, "reference", images.double())
    out = {"checks": {}}
    modes = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    # fp32: fp32 sums over up to 4096 terms (1e-5 typical); bf16: activations rounded to 8 bits at
    # every layer, errors of 4 layers + pool compound, a few ReLU masks flip: 5e-2
    tols = {"fp32": 1e-3, "bf16": 5e-2}
    ok = True
    for mode in modes:
        with precision(mode):
            got = grads(model, "triton", images)
        errs = {k: rel(got[k], want[k]) for k in want}
        worst = max(errs, key=errs.get)
        passed = all(e <= tols[mode] for e in errs.values())
        ok &= passed
        out["checks"][mode] = {"tolerance": tols[mode], "worst": worst, "worst_rel_err": errs[worst],
                               "passed": passed, "rel_err": errs}
    # one TTT step: graph replay == eager
    prim = TritonPrimitives()
    a, b = FlatStudent(model, cdt=cdt), FlatStudent(model, cdt=cdt)
    imgs, tgt = images[None], target[None]
    a.train_step(prim, imgs, tgt)
    if device.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            warm = FlatStudent(model, cdt=cdt)
            warm.train_step(prim, imgs, tgt)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            b.train_step(prim, imgs, tgt)
        g.replay()
        torch.cuda.synchronize()
    else:
        b.train_step(prim, imgs, tgt)
    step_err = (a.flat - b.flat).abs().max().item()
    moved = (a.flat - FlatStudent(model, cdt=cdt).flat).abs().max().item()
    # atomics (split-K, r) change summation order between runs; Adam's first step is ~lr * sign(g),
    # so only gradients within rounding of 0 can differ visibly
    step_ok = step_err <= 5e-2 * moved and moved > 0 and int(b.step.item()) == 1
    out["graph_step"] = {"max_abs_diff": step_err, "max_update": moved, "passed": step_ok}
    out["passed"] = ok and step_ok
    return out


# ------------------------------------------------------------------------------------ FLOPs
def gemm_shapes(cfg, B):
    """(name, M, N, K) of the forward GEMMs of the rewritten form (P shared by the B images)."""
    L, d = cfg.queries, cfg.pos_dim
    widths = list(cfg.hidden) + [cfg.dim]
    out = [("P = pos W_P^T", L, widths[0], d)]
    for i in range(1, len(widths)):
        name = "head" if i == len(widths) - 1 else f"fc{i + 1}"
        out.append((name, B * L, widths[i], widths[i - 1]))
    return out


def forward_flops(cfg, B, spec_count=False):
    """Executed forward FLOPs (P once for the B images) or, with spec_count, spec section 3's count
    (P per image)."""
    total = 0
    for name, m, n, k in gemm_shapes(cfg, B):
        total += 2 * m * n * k * (B if spec_count and name.startswith("P") else 1)
    return total


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for bench_triton.json")
    ap.add_argument("--preset", default="ttt-l14")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (smoke test of this script)")
    ap.add_argument("--big-batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--autotune-top", type=int, default=2, help="configs benchmarked per shape")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--skip-gate", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("APM_FAST_AUTOTUNE_TOP", str(args.autotune_top))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_triton: no CUDA GPU visible (use --device cpu --tiny for a smoke run)")
    cfg = preset(args.preset)
    if args.tiny:
        cfg = cfg.replace(grid=4, patch=2, hidden=(64, 48, 32), dim=16, heads=4)
    cuda = device.type == "cuda"
    cdt = torch.bfloat16 if cuda else torch.float32
    timer = Timer(device)
    t_start = time.perf_counter()
    res = {"machine": machine(device), "preset": args.preset, "tiny": args.tiny, "config": cfg.to_dict(),
           "targets": TARGETS, "phases_s": {}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_triton.json")

    def phase(name):
        res["phases_s"][name] = round(time.perf_counter() - t_start, 1)
        print(f"[{res['phases_s'][name]:7.1f} s] {name}", flush=True)

    # 1. gate --------------------------------------------------------------------------------
    if not args.skip_gate:
        # the gate checks the kernels, not the tuning: the top-ranked config, nothing benchmarked
        saved = os.environ.get("APM_FAST_AUTOTUNE")
        os.environ["APM_FAST_AUTOTUNE"] = "0"
        try:
            res["gate"] = gate(cfg, device, cdt)
        finally:
            if saved is None:
                os.environ.pop("APM_FAST_AUTOTUNE")
            else:
                os.environ["APM_FAST_AUTOTUNE"] = saved
        phase("gate")
        for mode, c in res["gate"]["checks"].items():
            print(f"  gate {mode}: worst {c['worst']} rel err {c['worst_rel_err']:.2e} "
                  f"(tol {c['tolerance']:.0e}) {'ok' if c['passed'] else 'FAILED'}")
        gs = res["gate"]["graph_step"]
        print(f"  gate graph step vs eager: {gs['max_abs_diff']:.2e} of update {gs['max_update']:.2e} "
              f"{'ok' if gs['passed'] else 'FAILED'}")
        if not res["gate"]["passed"]:
            with open(path, "w") as fh:
                json.dump(res, fh, indent=1)
            sys.exit("bench_triton: correctness gate failed; nothing timed (see the JSON)")

    torch.manual_seed(0)
    prim = TritonPrimitives()
    model = APM(cfg, dtype=torch.float32, device=device)

    # 2. ceiling -------------------------------------------------------------------------------
    if cuda:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        t = stats(timer.graph(lambda: a @ a, inner=3, reps=10))
        res["ceiling_tflops"] = 2 * 8192 ** 3 / t["median_ms"] / 1e9
        del a
    else:
        res["ceiling_tflops"] = float("nan")
    phase("ceiling")
    ceiling = res["ceiling_tflops"]

    # 3. forward -------------------------------------------------------------------------------
    res["forward"] = {}
    batches = [1, args.big_batch] if not args.tiny else [1, 2]
    for B in batches:
        st = FlatStudent(model, cdt=cdt)
        imgs = torch.randn(1, B, 3, cfg.image_size, cfg.image_size, device=device)
        entry = {"flops_executed": forward_flops(cfg, B), "flops_spec": forward_flops(cfg, B, spec_count=True)}
        with torch.no_grad():
            fwd = lambda: st.forward(prim, imgs)                               # noqa: E731
            entry["triton_graph"] = stats(timer.graph(fwd, reps=args.reps))
            entry["triton_eager"] = stats(timer.eager(fwd, reps=args.reps))
            ims = imgs[0]

            def torch_fwd():
                with torch.autocast(device.type, dtype=cdt, enabled=cuda):
                    return model(ims, backend="torch", want_grid=False).cls

            entry["torch_eager"] = stats(timer.eager(torch_fwd, reps=args.reps))
            if cuda and not args.no_compile:
                cf = torch.compile(torch_fwd)
                entry["torch_compile"] = stats(timer.eager(cf, reps=args.reps, warmup=3))
        ms = entry["triton_graph"]["median_ms"]
        entry["tflops_executed"] = entry["flops_executed"] / ms / 1e9
        entry["tflops_spec"] = entry["flops_spec"] / ms / 1e9
        entry["ceiling_fraction_spec"] = entry["tflops_spec"] / ceiling
        res["forward"][f"B={B}"] = entry
        del st
        phase(f"forward B={B}")

    # 4. primitives ----------------------------------------------------------------------------
    res["primitives"] = []
    st = FlatStudent(model, cdt=cdt)
    for B in batches:
        imgs = torch.randn(1, B, 3, cfg.image_size, cfg.image_size, device=device)
        z, f, ctx = st.forward(prim, imgs, save=True)
        target = torch.randn_like(z)
        items = _primitive_items(prim, st, ctx, f, z, target, cfg, B, backward=(B == 1))
        for name, fn, work, unit in items:
            t = stats(timer.graph(fn, inner=5, reps=max(10, args.reps // 2)))
            rate = work / t["median_ms"] / 1e9 if unit == "TFLOP/s" else work / t["median_ms"] / 1e6
            res["primitives"].append({"name": name, "B": B, **t, "rate": rate, "unit": unit})
        del z, f, ctx
        phase(f"primitives B={B}")

    # 5. TTT step ------------------------------------------------------------------------------
    imgs = torch.randn(1, 1, 3, cfg.image_size, cfg.image_size, device=device)
    target = torch.randn(1, 1, cfg.dim, device=device) * 0.1
    st = FlatStudent(model, cdt=cdt)
    step = {"flops_executed": 3 * forward_flops(cfg, 1)}   # backward ~ 2x forward
    step["triton_graph"] = stats(timer.graph(lambda: st.train_step(prim, imgs, target), reps=args.reps))
    step["triton_eager"] = stats(timer.eager(lambda: st.train_step(prim, imgs, target), reps=args.reps))
    tmodel = APM(cfg, dtype=torch.float32, device=device)
    opt = torch.optim.Adam(tmodel.parameters(), lr=1e-4, fused=cuda)
    ims, tg = imgs[0], target[0]

    def loss_fn():
        with torch.autocast(device.type, dtype=cdt, enabled=cuda):
            z = tmodel(ims, backend="torch", want_grid=False).cls
        return F.mse_loss(z.float(), tg)

    def torch_step(lf=loss_fn):
        opt.zero_grad(set_to_none=True)
        lf().backward()
        opt.step()

    step["torch_eager"] = stats(timer.eager(torch_step, reps=args.reps))
    if cuda and not args.no_compile:
        clf = torch.compile(loss_fn)
        step["torch_compile"] = stats(timer.eager(lambda: torch_step(clf), reps=args.reps, warmup=3))
    res["step"] = step
    phase("ttt step B=1")

    # verdicts ----------------------------------------------------------------------------------
    fb1 = res["forward"]["B=1"]["triton_graph"]["median_ms"]
    big = res["forward"][f"B={batches[-1]}"]
    res["verdict"] = {
        "forward_b1_ms": {"value": fb1, "target": TARGETS["forward_b1_ms"], "met": fb1 <= TARGETS["forward_b1_ms"]},
        "step_b1_graph_ms": {"value": step["triton_graph"]["median_ms"], "target": TARGETS["step_b1_graph_ms"],
                             "met": step["triton_graph"]["median_ms"] <= TARGETS["step_b1_graph_ms"]},
        "forward_b64_ceiling_fraction": {"value": big["ceiling_fraction_spec"],
                                         "target": TARGETS["forward_b64_ceiling_fraction"],
                                         "met": big["ceiling_fraction_spec"] >= TARGETS["forward_b64_ceiling_fraction"]},
    }
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print_table(res)
    print(f"wrote {path}")


def _primitive_items(prim, st, ctx, f, z, target, cfg, B, backward):
    """(name, fn, work, unit) for every primitive at this batch; work in FLOPs or bytes."""
    w, L, d, dim = st.w, cfg.queries, cfg.pos_dim, cfg.dim
    cdt = st.cdt
    hid = list(cfg.hidden)
    layers = [(w[f"mlp.{i}.weight"].to(cdt), w[f"mlp.{i}.bias"].to(cdt)) for i in range(1, len(hid))]
    layers.append((w["head.weight"].to(cdt), w["head.bias"].to(cdt)))
    wp = w["mlp.0.weight"][:, :, d:].to(cdt)
    p, u = ctx.p, ctx.u
    M = B * L
    esz = torch.finfo(cdt).bits // 8
    items = [("linear P (shared pos)", lambda: prim.linear(st.pos_in, wp, None, out_dtype=cdt), 2 * L * d * hid[0], "TFLOP/s"),
             ("first_layer_linear fc2", lambda: prim.first_layer_linear(p, u, *layers[0], relu=True, out_dtype=cdt),
              2 * M * hid[0] * hid[1], "TFLOP/s")]
    xs = [None] + ctx.acts
    for i, (wk, bk) in enumerate(layers[1:], start=1):
        x = ctx.acts[i - 1]
        relu = i < len(layers) - 1
        name = "head" if not relu else f"fc{i + 2}"
        items.append((f"linear {name}", lambda x=x, wk=wk, bk=bk, relu=relu: prim.linear(x, wk, bk, relu=relu, out_dtype=cdt),
                      2 * M * wk.shape[1] * wk.shape[2], "TFLOP/s"))
    sc = 1.0 / (cfg.head_dim ** 0.5)
    if cfg.pool:
        items.append(("pool_fwd", lambda: prim.pool_fwd(ctx.f, st.pos_out, ctx.kt, sc), 2 * M * dim * esz, "GB/s"))
    if not backward:
        return items
    dy = torch.randn_like(f.reshape(1, M, dim))
    if cfg.pool:
        dsbar = torch.randn_like(ctx.sbar)
        items.append(("pool_bwd (+ key grad)", lambda: prim.pool_bwd(ctx.f, st.pos_out, ctx.kt, sc, ctx.sbar, ctx.lse, dsbar),
                      3 * M * dim * esz, "GB/s"))
    for i in range(len(layers) - 1, 0, -1):
        wk = layers[i][0]
        x = xs[i]
        n, k = wk.shape[1], wk.shape[2]
        g = torch.randn(1, M, n, device=f.device, dtype=cdt)
        items.append((f"linear_bwd_weight {n}x{k}", lambda g=g, x=x: prim.linear_bwd_weight(g, x), 2 * M * n * k, "TFLOP/s"))
        items.append((f"linear_bwd_input {n}x{k} (mask)", lambda g=g, x=x, wk=wk: prim.linear_bwd_input(g, wk, mask=x, out_dtype=cdt),
                      2 * M * n * k, "TFLOP/s"))
    w2 = layers[0][0]
    g2 = torch.randn(1, M, w2.shape[1], device=f.device, dtype=cdt)
    items.append(("first_layer_bwd_weight fc2", lambda: prim.first_layer_bwd_weight(g2, p, u), 2 * M * w2.shape[1] * w2.shape[2], "TFLOP/s"))
    items.append(("first_layer_bwd_input fc2 (+ r)", lambda: prim.first_layer_bwd_input(g2, w2, p, u, out_dtype=cdt),
                  2 * M * w2.shape[1] * w2.shape[2], "TFLOP/s"))
    g1 = torch.randn(1, L, hid[0], device=f.device, dtype=cdt)
    items.append(("linear_bwd_weight dW_P (shared pos)", lambda: prim.linear_bwd_weight(g1, st.pos_in, bias=False),
                  2 * L * hid[0] * d, "TFLOP/s"))
    nparam = st.flat.numel()
    # p, g, m, v read (16 B); p, m, v written (12 B); bf16 copy written (2 B)
    step_t = torch.ones(1, device=f.device)
    items.append(("adam_ (flat, + bf16 copy)", lambda: prim.adam_(st.flat, st.grad, st.m, st.v,
                                                                 step_t, st.lr, 0.9, 0.999, 1e-8, lowp=st.lowp),
                  30 * nparam, "GB/s"))
    return items


def print_table(res):
    m = res["machine"]
    print(f"\n{m['device']} | torch {m['torch']} | triton {m['triton']} | commit {m['commit']} | "
          f"bf16 GEMM ceiling {res['ceiling_tflops']:.0f} TFLOP/s")
    print(f"{'what':44s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'rate':>12s}")

    def row(name, s, rate=""):
        print(f"{name:44s} {s['median_ms']:10.4f} {s['p10_ms']:8.4f} {s['p90_ms']:8.4f} {rate:>12s}")

    for key, e in res["forward"].items():
        for impl in ("triton_graph", "triton_eager", "torch_eager", "torch_compile"):
            if impl in e:
                rate = f"{e['tflops_spec']:.0f} TF/s*" if impl == "triton_graph" else ""
                row(f"forward {key} {impl}", e[impl], rate)
    for p in res["primitives"]:
        row(f"{p['name']} B={p['B']}", p, f"{p['rate']:.0f} {p['unit']}")
    for impl in ("triton_graph", "triton_eager", "torch_eager", "torch_compile"):
        if impl in res["step"]:
            row(f"TTT step B=1 {impl}", res["step"][impl])
    print("* spec section 3 FLOP count (P counted per image)")
    for k, v in res["verdict"].items():
        print(f"target {k}: {v['value']:.4g} (target {v['target']}) {'met' if v['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
