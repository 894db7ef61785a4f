"""Config sweep of the Triton GEMM and weight-gradient primitives at one preset's shapes (GPU only).

    python benchmarks/sweep_triton.py --out results/sweep-h100

For every primitive at the preset's layer shapes (default ``ttt-l14``: L = 1024, widths
1024 -> 4096 -> 2048 -> 1024 -> 768; the first consumer's forward both with the activation built in
its prologue, ``fc2 first_layer_linear``, and as the step runs it, a plain GEMM on the activation
the forward kept, ``fc2 linear``), for (S, B) in (1, 1), (8, 1), (1, 64) (``--sets`` picks others,
e.g. ``--sets 1x1`` for one image's step), bf16:

1. candidates: TMA descriptors vs pointer loads, persistent tile loop or not, the first layer's
   activation fused in the prologue vs materialized per chunk of images, tiles, warps, stages, and
   for the weight gradients output tiles, reduction steps and split-K factors;
2. every candidate is first compiled in parallel worker processes (filling Triton's cache), then,
   in this process, checked against torch on the same bf16 inputs in fp32 (relative Frobenius
   error <= 1e-2, every element finite; outputs NaN-poisoned first) and only then timed: a CUDA
   graph of repeated calls (no launch overhead), median of several replays;
3. beside it: what runs today without a config (the table's entry or the heuristic's first choice,
   autotuning off) and cuBLAS (torch.matmul / bmm in bf16 on the same shapes; for the first layer
   on the materialized activation, for the weight gradients with a bf16 output).

Writes ``sweep_triton.json`` (every candidate's time or error) and ``tuned_configs.py`` (the whole
of ``apm_fast/kernels/tuned_configs.py`` with the winners in this GPU's block, over that block's
earlier entries, and every other GPU's block as it was: ready to copy there) under
``--out`` and prints the best per shape with TFLOP/s. ``--budget-s`` bounds the whole run (default
220 s): problems are measured in order and the rest skipped once it is spent.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

os.environ["APM_FAST_AUTOTUNE"] = "0"       # every config is explicit; "today" = table or heuristic
SMOKE = "--smoke" in sys.argv                # CPU run of this script's logic on tiny shapes (interpreter)
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

SETS = [(1, 1), (8, 1), (1, 64)] if not SMOKE else [(1, 1), (2, 3)]     # (S, B)
TOL = 1e-2
DEVICE = "cpu" if SMOKE else "cuda"
# bf16 on the GPU; fp16 in the smoke run (the interpreter's bf16 arithmetic is wrong)
DTYPE = torch.float16 if SMOKE else torch.bfloat16


# ------------------------------------------------------------------------------------ problems
def problem_list(preset_name, sets=SETS):
    """[(name, S, B)] of every primitive at the preset's shapes; specs are rebuilt from this in
    each process (workers included)."""
    out = []
    for S, B in sets:
        for name in ("P linear_shared", "fc2 first_layer_linear", "fc2 linear", "fc3 linear", "head linear",
                     "head linear_bwd_input", "fc3 linear_bwd_input", "fc2 first_layer_bwd_input",
                     "head linear_bwd_weight", "fc3 linear_bwd_weight", "fc2 first_layer_bwd_weight",
                     "P linear_bwd_weight_shared"):
            if name.startswith("P ") and B != 1:
                continue      # P and dW_P do not depend on B
            out.append((name, S, B))
    # the forward GEMMs of every (S, B) first: if the budget runs out, the backward ones go
    return sorted(out, key=lambda p: ("bwd" in p[0] or "P linear_bwd" in p[0]))


def dims(preset_name):
    if SMOKE:
        return 32, 16, [64, 32, 32, 16]
    from apm_fast import preset

    cfg = preset(preset_name)
    return cfg.queries, cfg.pos_dim, list(cfg.hidden) + [cfg.dim]


class Problem:
    """Inputs, the call with a config, the fp32 reference, cuBLAS, FLOPs of one (name, S, B)."""

    def __init__(self, preset_name, name, S, B):
        self.name, self.S, self.B = name, S, B
        self.layer, self.prim = name.split(" ")
        self.L, self.d, self.widths = dims(preset_name)
        self.wgrad = "bwd_weight" in self.prim
        self.t = None

    # shapes: (M rows, N out, K reduction) of the product, per student
    def mnk(self):
        L, d, H = self.L, self.d, self.widths
        M = self.B * L
        return {"P": (L, H[0], d), "fc2": (M, H[1], H[0]), "fc3": (M, H[2], H[1]), "head": (M, H[3], H[2])}[self.layer]

    def flops(self):
        M, N, K = self.mnk()
        return 2 * self.S * M * N * K

    def build(self, device=DEVICE):
        torch.manual_seed(0)
        S, B, L = self.S, self.B, self.L
        M, N, K = self.mnk()
        bf = DTYPE
        r = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(bf)   # noqa: E731
        t = {}
        p = self.prim
        if p == "linear_shared":
            t.update(x=r(M, K), w=r(S, N, K, scale=K ** -0.5))
        elif p == "linear":
            t.update(x=r(S, M, K), w=r(S, N, K, scale=K ** -0.5), b=r(S, N, scale=0.1))
        elif p == "first_layer_linear":
            t.update(p=r(S, L, K), u=torch.randn(S, B, K, device=device), w=r(S, N, K, scale=K ** -0.5),
                     b=r(S, N, scale=0.1))
        elif p == "linear_bwd_input":      # dx (M, K) = dy (M, N) w (N, K): here N is the layer's output
            t.update(dy=r(S, M, N), w=r(S, N, K, scale=N ** -0.5), mask=torch.relu(r(S, M, K)))
        elif p == "first_layer_bwd_input":
            t.update(dy=r(S, M, N), w=r(S, N, K, scale=N ** -0.5), p=r(S, L, K), u=torch.randn(S, B, K, device=device))
        elif p == "linear_bwd_weight":
            t.update(dy=r(S, M, N), x=r(S, M, K))
        elif p == "linear_bwd_weight_shared":
            t.update(dy=r(S, M, N), x=r(M, K))
        elif p == "first_layer_bwd_weight":
            t.update(dy=r(S, M, N), p=r(S, L, K), u=torch.randn(S, B, K, device=device))
        self.t = t
        return t

    def free(self):
        self.t = None

    def call(self, cfg):
        """The primitive with ``cfg`` (None: what runs without a config)."""
        from apm_fast.kernels import gemm, wgrad

        t, p = self.t, self.prim
        if p in ("linear", "linear_shared"):
            return gemm.linear(t["x"], t["w"], t.get("b"), relu=p == "linear" and self.layer != "head", config=cfg)
        if p == "first_layer_linear":
            return gemm.first_layer_linear(t["p"], t["u"], t["w"], t["b"], relu=True, config=cfg)
        if p == "linear_bwd_input":
            return gemm.linear_bwd_input(t["dy"], t["w"], mask=t["mask"], config=cfg)
        if p == "first_layer_bwd_input":
            return gemm.first_layer_bwd_input(t["dy"], t["w"], t["p"], t["u"], config=cfg)
        if p in ("linear_bwd_weight", "linear_bwd_weight_shared"):
            return wgrad.linear_bwd_weight(t["dy"], t["x"], bias=p == "linear_bwd_weight", config=cfg)
        if p == "first_layer_bwd_weight":
            return wgrad.first_layer_bwd_weight(t["dy"], t["p"], t["u"], config=cfg)
        raise ValueError(p)

    def reference(self):
        """fp32 torch on the same bf16 inputs (a tuple of tensors, like call's outputs)."""
        from apm_fast.ops.contract import TorchPrimitives, first_layer_act

        T = TorchPrimitives()
        t, p = {k: v.float() for k, v in self.t.items()}, self.prim
        if p in ("linear", "linear_shared"):
            return T.linear(t["x"], t["w"], t.get("b"), relu=p == "linear" and self.layer != "head")
        if p == "first_layer_linear":
            # the kernels round ReLU(P + u) to bf16 before the product, as the bf16 model does
            a = first_layer_act(self.t["p"], t["u"]).float()
            return T.linear(a, t["w"], t["b"], relu=True)
        if p == "linear_bwd_input":
            return T.linear_bwd_input(t["dy"], t["w"], mask=t["mask"])
        if p == "first_layer_bwd_input":
            return T.first_layer_bwd_input(t["dy"], t["w"], t["p"], t["u"])
        if p in ("linear_bwd_weight", "linear_bwd_weight_shared"):
            return T.linear_bwd_weight(t["dy"], t["x"], bias=p == "linear_bwd_weight")
        a = first_layer_act(self.t["p"], t["u"]).float()
        return T.linear_bwd_weight(t["dy"], a)

    def cublas(self):
        """A torch.matmul call of the same product in bf16."""
        t, p = self.t, self.prim
        if p in ("linear", "linear_shared"):
            return lambda: torch.matmul(t["x"], t["w"].transpose(1, 2))
        if p == "first_layer_linear":
            from apm_fast.ops.contract import first_layer_act

            a = first_layer_act(t["p"], t["u"])
            return lambda: torch.bmm(a, t["w"].transpose(1, 2))
        if p in ("linear_bwd_input", "first_layer_bwd_input"):
            return lambda: torch.bmm(t["dy"], t["w"])
        if p == "first_layer_bwd_weight":
            from apm_fast.ops.contract import first_layer_act

            a = first_layer_act(t["p"], t["u"])
            return lambda: torch.bmm(t["dy"].transpose(1, 2), a)
        x = t["x"] if t["x"].dim() == 3 else t["x"].expand(self.S, *t["x"].shape)
        return lambda: torch.bmm(t["dy"].transpose(1, 2), x)

    # ------------------------------------------------------------------ candidates
    def candidates(self, sms):
        from apm_fast.kernels import configs
        from apm_fast.kernels.configs import GemmCfg, WgradCfg

        M, N, K = self.mnk()
        if self.wgrad:
            rows = M
            tiles_of = lambda bn, bk: self.S * -(-N // bn) * -(-K // bk)     # noqa: E731
            tiles = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
                     (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 4, 4)]
            out = []
            for bn, bk, bm, w, s in tiles:
                splits = configs.splits_for(tiles_of(bn, bk), rows, bm, sms)
                if tiles_of(bn, bk) < sms:     # one more: between one and two waves
                    splits = sorted(set(splits) | {max(1, min(rows // (4 * bm), -(-sms // tiles_of(bn, bk))))})
                for k in splits[:4]:
                    out.append(WgradCfg(bn, bk, bm, w, s, k, tma=True))
            ptr = configs.rank_wgrad(configs.wgrad_candidates(2, False, tiles_of=tiles_of, rows=rows, sms=sms),
                                     tiles_of=tiles_of, rows=rows, sms=sms, elt=2)[:2]
            return self._trim([c for c in dict.fromkeys(out + ptr) if c.smem(2) <= configs.SMEM_BUDGET])
        tiles = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                 (128, 128, 64, 8, 5), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                 (64, 256, 64, 4, 4)]
        out = []
        for bm, bn, bk, w, s in tiles:
            out += [GemmCfg(bm, bn, bk, w, s, tma=True, persistent=True), GemmCfg(bm, bn, bk, w, s, tma=True)]
        if self.prim == "first_layer_linear":
            for bm, bn, bk, w, s in tiles[:3] + tiles[5:6]:
                out.append(GemmCfg(bm, bn, bk, w, s, tma=True, persistent=True, materialize=True))
            out.append(GemmCfg(128, 128, 64, 8, 4, tma=True, materialize=True))
        nseg = self.B if self.prim.startswith("first_layer") else 1
        L = self.L if self.prim.startswith("first_layer") else M
        ptr = configs.rank_gemm(configs.gemm_candidates(2, False), S=self.S, NSEG=nseg, L=L, N=N, sms=sms,
                                elt=2, out_elt=2)[:2]
        return self._trim([c for c in dict.fromkeys(out + ptr) if c.smem(2, 2 if c.tma else 0) <= configs.SMEM_BUDGET])

    @staticmethod
    def _trim(cands):
        """The smoke run tries the first few of each kind only (the interpreter is slow)."""
        if not SMOKE:
            return cands
        keep = {}
        for c in cands:
            keep.setdefault((c.tma, getattr(c, "persistent", False), getattr(c, "materialize", False)), c)
        return list(keep.values())


# ------------------------------------------------------------------------------------ measuring
def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sm_count():
    from apm_fast.kernels._common import sm_count as sms

    return sms(torch.device(DEVICE))


def outputs(o):
    return tuple(x for x in (o if isinstance(o, tuple) else (o,)) if x is not None)


def rel_err(got, ref):
    errs = []
    for g, r in zip(outputs(got), outputs(ref)):
        if not torch.isfinite(g).all():
            return math.inf
        r = r.float()
        errs.append(((g.float() - r).norm() / r.norm().clamp_min(1e-30)).item())
    return max(errs)


def time_ms(fn, target_ms=3.0, reps=7):
    """Device time per call: calls captured in one CUDA graph (the engine's capture), replayed;
    median of ``reps`` replays (fewer than the harness's 20: the sweep times hundreds of configs)."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from apm_fast.ttt.graph import capture_phases

    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    inner = max(1, min(50, int(target_ms / max(a.elapsed_time(b), 1e-3))))
    graphs = capture_phases({"calls": lambda: [fn() for _ in range(inner)]}, lambda: None, "cuda",
                            warmup=1, key="sweep")
    if graphs is None:
        raise RuntimeError("CUDA graph capture failed")
    g = graphs["calls"]
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / inner)
    del g
    return statistics.median(out)


def _probe_default(prob):
    """(the tuned-table key the launcher uses, the table's config or None, the heuristic's first):
    the launcher is run once without a config while its lookups are watched."""
    from apm_fast.kernels import _common, configs, gemm, wgrad

    seen = {}
    orig_te, orig_pick = configs.tuned_entry, _common.pick

    def te(prim, key, cls, elt, device=None):
        seen["key"] = (prim, *key)
        seen["table"] = orig_te(prim, key, cls, elt, device)
        return seen["table"]

    def pk(key, ranked, run, device):
        seen["heuristic"] = ranked[0]
        return orig_pick(key, ranked, run, device)

    gemm.tuned_entry = wgrad.tuned_entry = te
    _common.pick = pk
    try:
        prob.call(None)
        sync()
    finally:
        gemm.tuned_entry = wgrad.tuned_entry = orig_te
        _common.pick = orig_pick
    return seen


# ------------------------------------------------------------------------------------ compiling
def _compile_worker(args):
    """Worker process: build one problem and launch every candidate once (fills Triton's cache)."""
    preset_name, name, S, B, deadline = args
    res = {}
    try:
        prob = Problem(preset_name, name, S, B)
        prob.build()
        for cfg in prob.candidates(sm_count()):
            if time.time() > deadline:
                break
            try:
                prob.call(cfg)
                sync()
                res[cfg.name()] = "ok"
            except Exception as e:          # reported; the main process skips it
                res[cfg.name()] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    except Exception:
        res["<problem>"] = traceback.format_exc()[-800:]
    return (name, S, B), res


def precompile(preset_name, plist, jobs, deadline):
    if jobs <= 1:
        return {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        out = dict(pool.map(_compile_worker, [(preset_name, n, s, b, deadline) for n, s, b in plist], chunksize=1))
    return out


# ------------------------------------------------------------------------------------ main
def measure(prob, sms, compiled, deadline):
    from apm_fast.kernels import _common

    entry = {"name": prob.name, "S": prob.S, "B": prob.B, "mnk": prob.mnk(), "flops": prob.flops(), "candidates": []}
    prob.build()
    ref = prob.reference()
    seen = _probe_default(prob)
    entry["key"] = list(seen.get("key", ()))
    entry["table"] = seen["table"].to_dict() if seen.get("table") else None
    entry["heuristic"] = seen["heuristic"].to_dict() if seen.get("heuristic") else None
    tf = lambda ms: prob.flops() / ms / 1e9   # noqa: E731
    entry["cublas_ms"] = time_ms(prob.cublas())
    entry["cublas_tflops"] = tf(entry["cublas_ms"])
    entry["today_ms"] = time_ms(lambda: prob.call(None))
    entry["today_tflops"] = tf(entry["today_ms"])
    for cfg in prob.candidates(sms):
        c = {"config": cfg.to_dict(), "name": cfg.name()}
        entry["candidates"].append(c)
        pre = compiled.get(cfg.name())
        if pre is not None and pre != "ok":
            c["error"] = pre
            continue
        if time.time() > deadline:
            c["error"] = "skipped: time budget spent"
            continue
        try:
            _common.POISON_OUTPUTS = True
            err = rel_err(prob.call(cfg), ref)
            _common.POISON_OUTPUTS = False
            c["rel_err"] = err
            if not err <= TOL:
                c["error"] = f"wrong result: relative error {err:.3e} > {TOL}"
                continue
            c["ms"] = time_ms(lambda: prob.call(cfg))
            c["tflops"] = tf(c["ms"])
        except Exception as e:
            _common.POISON_OUTPUTS = False
            c["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if "CUDA error" in str(e) or "illegal" in str(e).lower():
                raise            # the context is gone: stop here, keep what was measured
    ok = [c for c in entry["candidates"] if "ms" in c]
    entry["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
    prob.free()
    del ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return entry


def tuned_table_text(results, machine: dict, capability) -> str:
    """The whole of ``apm_fast/kernels/tuned_configs.py`` with this sweep's winners in its GPU's
    block, over that block's entries (a partial sweep, ``--only`` or ``--sets``, keeps the rest),
    and every other GPU's block as it is: ready to copy there."""
    from apm_fast.kernels import tuned_configs
    from apm_fast.kernels.configs import render_tuned

    table = {gpu: {**block, "configs": dict(block["configs"])} for gpu, block in tuned_configs.TUNED.items()}
    gpu = machine.get("gpu") or "cpu (Triton's interpreter)"
    block = table.setdefault(gpu, {"capability": capability, "configs": {}})
    block["capability"] = capability
    won = {tuple(e["key"]): {"config": e["best"]["config"], "tflops": round(e["best"]["tflops"]),
                             "cublas_tflops": round(e["cublas_tflops"])}
           for e in results if e.get("best") and e.get("key")}
    source = (f"benchmarks/sweep_triton.py at commit {machine.get('commit')}, triton {machine.get('triton')}, "
              f"torch {machine.get('torch')}")
    kept = set(block["configs"]) - set(won)          # entries of an earlier sweep this one did not cover
    block["source"] = f"{block['source']}; then {source}" if kept and block.get("source") else source
    block["configs"].update(won)
    return render_tuned(table, tuned_configs.__doc__)


def print_table(res):
    print(f"\n{res['machine']['gpu'] or res['machine']['cpu']} | torch {res['machine']['torch']} | triton {res['machine']['triton']}")
    print(f"{'primitive':34s} {'S':>2s} {'B':>3s} {'best config':40s} {'ms':>8s} {'TF/s':>5s} "
          f"{'today ms':>9s} {'TF/s':>5s} {'cuBLAS':>8s} {'TF/s':>5s}")
    for e in res["problems"]:
        b = e.get("best")
        best = (f"{b['name']:40s} {b['ms']:8.4f} {b['tflops']:5.0f}" if b else f"{'(none passed)':40s} {'':8s} {'':5s}")
        print(f"{e['name']:34s} {e['S']:2d} {e['B']:3d} {best} {e['today_ms']:9.4f} {e['today_tflops']:5.0f} "
              f"{e['cublas_ms']:8.4f} {e['cublas_tflops']:5.0f}")


def _sets(text):
    """"1x1,8x1" -> [(1, 1), (8, 1)] (argparse type of --sets)."""
    out = []
    for item in text.split(","):
        try:
            a, b = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected SxB pairs such as 1x1,8x1 (students x images), got {item!r}")
        if a < 1 or b < 1:
            raise argparse.ArgumentTypeError(f"students and images must be >= 1, got {item!r}")
        out.append((a, b))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for sweep_triton.json and tuned_configs.py")
    ap.add_argument("--preset", default="ttt-l14")
    ap.add_argument("--budget-s", type=float, default=220.0, help="wall-clock budget of the whole run")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile worker processes")
    ap.add_argument("--only", default="", help="comma-separated substrings: sweep only matching primitives")
    ap.add_argument("--sets", type=_sets, default=None,
                    help="comma-separated SxB pairs of students and images a student (default: "
                         + ",".join(f"{a}x{b}" for a, b in SETS) + ")")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter (a test "
                    "of this script, not a measurement)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not SMOKE:
        sys.exit("sweep_triton: needs a CUDA GPU (--smoke runs the script's logic on tiny CPU shapes)")
    t0 = time.time()
    plist = problem_list(args.preset, args.sets or SETS)
    if args.only:
        plist = [p for p in plist if any(s in p[0] for s in args.only.split(","))]
    from apm_fast.bench.machine import machine_info

    res = {"machine": machine_info(DEVICE, str(DTYPE).replace("torch.", "")),
           "preset": args.preset, "tolerance": TOL, "problems": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep_triton.json")
    # compiling may take at most ~45% of the budget; what is not compiled by then compiles below
    compiled = precompile(args.preset, plist, args.jobs, t0 + 0.45 * args.budget_s)
    res["compile_s"] = round(time.time() - t0, 1)
    print(f"[{time.time() - t0:6.1f} s] compiled {sum(len(v) for v in compiled.values())} candidates "
          f"in {args.jobs} processes", flush=True)
    sms = sm_count()
    from apm_fast.kernels.configs import gpu_identity

    capability = gpu_identity(torch.device(DEVICE))[1]
    deadline = t0 + args.budget_s
    try:
        for name, S, B in plist:
            if time.time() > deadline:
                res["problems"].append({"name": name, "S": S, "B": B, "skipped": "time budget spent"})
                continue
            e = measure(Problem(args.preset, name, S, B), sms, compiled.get((name, S, B), {}), deadline)
            res["problems"].append(e)
            b = e.get("best")
            best = f"{b['name']} {b['ms']:.4f} ms {b['tflops']:.0f} TF/s" if b else "none passed"
            print(f"[{time.time() - t0:6.1f} s] {name} S={S} B={B}: best {best} | today {e['today_ms']:.4f} ms"
                  f" | cuBLAS {e['cublas_ms']:.4f} ms", flush=True)
    finally:
        res["total_s"] = round(time.time() - t0, 1)
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
        with open(os.path.join(args.out, "tuned_configs.py"), "w") as fh:
            fh.write(tuned_table_text([e for e in res["problems"] if "candidates" in e], res["machine"],
                                      capability))
    print_table({**res, "problems": [e for e in res["problems"] if "candidates" in e]})
    print(f"wrote {path} and tuned_configs.py ({res['total_s']} s)")


if __name__ == "__main__":
    main()
