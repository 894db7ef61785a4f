"""TTT engine benchmark (GPU): correctness gate, then step latency, students side by side,
memory per student, where the time goes, and end to end with a ViT-L/14 teacher.

    python benchmarks/bench_engine.py --out results/            # writes results/bench_engine.json
    python benchmarks/bench_engine.py --out engine.json --quick # smaller run

Workload: ``ttt-l14`` (22.0 M parameters, L = 1024, D = 768), bf16 compute, fp32 state, 20 Adam
steps per image. Targets (H100): one image one step <= 0.25 ms; side by side >= 250 images/s
(teacher excluded); end to end >= 200 images/s. Every backend with a primitive table is measured
("torch", and "triton"/"cuda" where they load), each only after it passed the gate in this run.
Floors printed beside the numbers: compute (86.5 GFLOP per step at the measured 738 TFLOP/s bf16
peak) and Adam's memory traffic (fp32 p, g, m, v read; p, m, v and the bf16 copy written:
30 B per parameter per step at 3.0 TB/s).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apm_fast import APM, TestTimeTrainer, preset  # noqa: E402
from apm_fast.backends import available_backends, get_backend  # noqa: E402
from apm_fast.engine import TTTEngine, classify_images, count_params  # noqa: E402
from apm_fast.engine.program import StudentProgram  # noqa: E402

PEAK_BF16 = 738e12          # spec section 4: bf16 GEMM 8192^3 on the lent H100
HBM = 3.0e12                # spec section 4: device copy, read + write
ADAM_BYTES = 30             # per parameter per step: read p g m v (16), write p m v (12) + bf16 copy (2)
TARGETS = {"step_ms": 0.25, "side_by_side_ips": 250.0, "e2e_ips": 200.0, "one_student_gb": 0.45}
GATE_CFG = dict(grid=8, patch=14, hidden=(512, 384, 256), dim=128, heads=8)


# ---------------------------------------------------------------------------------------- setup
def machine() -> dict:
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except Exception:
        info["commit"] = None
    return info


def fused_backends(wanted):
    out, why = [], {}
    for name, status in available_backends().items():
        if wanted and name not in wanted:
            continue
        if status != "available":
            why[name] = status
            continue
        if hasattr(get_backend(name, check=False), "primitives"):
            out.append(name)
    return out, why


def step_flops(cfg) -> float:
    """FLOPs of one rewritten TTT step at B = 1 (spec section 3: 86.5 GF for ttt-l14): the forward
    GEMMs (P, every later layer, the head) once, their backward twice (dX and dW), except P whose
    backward is dW_P only; the pool and the per-image pieces are negligible."""
    L, widths = cfg.queries, cfg.hidden + (cfg.dim,)
    p = 2 * L * cfg.pos_dim * cfg.hidden[0]
    rest = sum(2 * L * a * b for a, b in zip(widths[:-1], widths[1:]))
    return 2 * p + 3 * rest


def forward_flops(cfg) -> float:
    L, widths = cfg.queries, cfg.hidden + (cfg.dim,)
    return 2 * L * cfg.pos_dim * cfg.hidden[0] + sum(2 * L * a * b for a, b in zip(widths[:-1], widths[1:]))


def floors(cfg, steps) -> dict:
    n = count_params(cfg)
    compute_ms = step_flops(cfg) / PEAK_BF16 * 1e3
    adam_ms = n * ADAM_BYTES / HBM * 1e3
    per_image_ms = steps * (compute_ms + adam_ms)
    return {"params": n, "step_gflop": step_flops(cfg) / 1e9, "compute_floor_ms": compute_ms,
            "adam_traffic_floor_ms": adam_ms, "step_floor_ms": compute_ms + adam_ms,
            "side_by_side_ceiling_ips": 1e3 / per_image_ms}


def model_for(cfg_kw, seed=0):
    torch.manual_seed(seed)
    return APM(preset("ttt-l14", **cfg_kw), device="cuda")


def inputs(model, n, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    px = model.config.image_size
    return (torch.randn(n, 3, px, px, device="cuda", generator=g),
            torch.randn(n, model.config.dim, device="cuda", generator=g))


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def closest(cls, targets):
    n = torch.nn.functional.normalize
    return (n(cls.float(), dim=-1) @ n(targets.float(), dim=-1).t()).argmax(1)


# ---------------------------------------------------------------------------------------- gate
def gate(backend) -> dict:
    """The engine through ``backend`` against the autograd reference (fp32) and against itself
    (graph vs eager, side by side vs alone, bf16)."""
    model = model_for(GATE_CFG)
    x, y = inputs(model, 5)
    kw = dict(steps=5, lr=1e-3, backend=backend)
    out = {}
    ref = TestTimeTrainer(model, backend="torch", engine=False, **{k: kw[k] for k in ("steps", "lr")}).fit(x, y)
    e32 = TTTEngine(model, students=3, compute_dtype=torch.float32, **kw)
    fp32 = e32.fit(x, y)
    out["fp32_vs_autograd_rel"] = rel(fp32.cls, ref.cls)
    out["fp32_same_class"] = bool(torch.equal(closest(fp32.cls, y), closest(ref.cls, y)))
    out["mode"] = e32.mode
    g16 = TTTEngine(model, students=3, compute_dtype=torch.bfloat16, graphs=True, **kw).fit(x, y)
    e16 = TTTEngine(model, students=3, compute_dtype=torch.bfloat16, graphs=False, **kw).fit(x, y)
    a16 = TTTEngine(model, students=1, compute_dtype=torch.bfloat16, graphs=True, **kw).fit(x, y)
    out["bf16_graph_vs_eager_rel"] = rel(g16.cls, e16.cls)
    out["bf16_side_by_side_vs_alone_rel"] = rel(g16.cls, a16.cls)
    out["bf16_vs_autograd_rel"] = rel(g16.cls, ref.cls)
    # bf16 against fp32 is judged relative to what plain PyTorch loses in bf16 on the same run
    # (Adam's normalized first steps amplify rounding in tiny gradients, for any bf16 code)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = TestTimeTrainer(model, backend="torch", engine=False, **{k: kw[k] for k in ("steps", "lr")}).fit(x, y)
    out["torch_bf16_autocast_vs_autograd_rel"] = rel(amp.cls, ref.cls)
    bf16_tol = 2 * out["torch_bf16_autocast_vs_autograd_rel"] + 1e-2
    out["bf16_tolerance"] = bf16_tol
    out["bf16_same_class"] = bool(torch.equal(closest(g16.cls, y), closest(a16.cls, y))
                                  and torch.equal(closest(g16.cls, y), closest(ref.cls, y)))
    out["passed"] = bool(out["fp32_vs_autograd_rel"] <= 1e-3 and out["fp32_same_class"]
                         and out["bf16_graph_vs_eager_rel"] <= 2e-2
                         and out["bf16_side_by_side_vs_alone_rel"] <= 2e-2
                         and out["bf16_vs_autograd_rel"] <= bf16_tol and out["bf16_same_class"])
    return out


# ---------------------------------------------------------------------------------------- timing
def _time_steps(prog, fn, steps, reps):
    """Median ms per step over ``reps`` runs of ``steps`` steps from the snapshot."""
    times = []
    for _ in range(reps):
        prog.reset()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def latency(backend, steps, reps) -> dict:
    """One image, one step: the captured step replayed vs the same step eagerly; one whole image."""
    model = model_for({})
    x, y = inputs(model, 1)
    out = {}
    for graphs in (True, False):
        prog = StudentProgram(get_backend(backend).primitives, model.config,
                              {n: p.detach() for n, p in model.named_parameters()}, 1, steps, lr=1e-4,
                              betas=(0.9, 0.999), eps=1e-8, compute_dtype=torch.bfloat16,
                              master_dtype=torch.float32, device="cuda", graphs=graphs)
        prog.images[:, 0].copy_(x)
        prog.targets.copy_(y)
        fn = prog.graphs["step"].replay if prog.graphs is not None else prog._step
        _time_steps(prog, fn, steps, 1)                        # warm
        out["graph" if graphs else "eager"] = _time_steps(prog, fn, steps, reps if graphs else max(2, reps // 2))
        out["graph" if graphs else "eager"]["mode"] = prog.mode
        del prog
    eng = TTTEngine(model, steps=steps, backend=backend, students=1, compute_dtype=torch.bfloat16)
    eng.fit(x, y)
    t = []
    for _ in range(reps):
        t.append(eng.fit(x, y).seconds[0] * 1e3)
    out["one_image_ms"] = statistics.median(t)
    out["tflops_graph"] = step_flops(model.config) / (out["graph"]["median_ms"] * 1e-3) / 1e12
    return out


def _shared_ready(model):
    """What all students share, made before a baseline: the position codes, and cuBLAS's
    per-stream workspaces on the current stream and on the engine's capture stream."""
    from apm_fast.engine.graph import _side_stream

    model.pos_in(dtype=torch.bfloat16)
    model.pos_out(dtype=torch.bfloat16)
    a = torch.randn(64, 64, device=model.device)
    for st in (torch.cuda.current_stream(model.device), _side_stream(model.device)):
        with torch.cuda.stream(st):
            torch.bmm(a[None], a[None])
            torch.bmm(a[None].bfloat16(), a[None].bfloat16())
    torch.cuda.synchronize()


def one_student_memory(backend, steps) -> dict:
    """Peak bytes of one ttt-l14 student at B = 1 above what existed before (model, snapshot,
    position codes, cuBLAS workspaces: shared by all students)."""
    model = model_for({})
    x, y = inputs(model, 1)
    eng = TTTEngine(model, steps=steps, backend=backend, students=1, compute_dtype=torch.bfloat16)
    _shared_ready(model)
    base, base_res = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    eng.fit(x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    prog = eng._program
    n = count_params(model.config)
    mem = eng.student_memory()
    return {"peak_gb": peak / 1e9, "peak_gib": peak / 2 ** 30,
            "reserved_delta_gb": (torch.cuda.memory_reserved() - base_res) / 1e9,
            "state_gb": prog.store.nbytes() / 1e9, "state_bytes_per_param": prog.store.nbytes() / n,
            "snapshot_gb_shared": 4 * n / 1e9, "probe_per_student_gb": mem["per_student"] / 1e9,
            "probe_shared_gb": mem["shared"] / 1e9, "mode": eng.mode,
            "target_met": peak <= TARGETS["one_student_gb"] * 1e9}


def side_by_side(backend, steps, s_list, max_s) -> dict:
    model = model_for({})
    fl = step_flops(model.config) * steps + forward_flops(model.config)
    out = {}
    for s in s_list:
        if s > max_s:
            out[str(s)] = {"skipped": f"more than the {max_s} students that fit"}
            continue
        x, y = inputs(model, 2 * s, seed=s)
        eng = TTTEngine(model, steps=steps, backend=backend, students=s, compute_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        eng.fit(x[:s], y[:s])                                  # build, capture, warm
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.fit(x, y)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        ips = 2 * s / dt
        out[str(s)] = {"images_per_s": ips, "ms_per_batch": dt / 2 * 1e3, "tflops": ips * fl / 1e12,
                       "peak_gb_per_student": peak / s / 1e9, "mode": eng.mode}
        del eng, x, y
        torch.cuda.empty_cache()
    return out


def where_time_goes(backend, steps, s) -> dict:
    """Kernel time per name over one batch of ``s`` students (graph replays), top entries."""
    from torch.profiler import ProfilerActivity, profile

    model = model_for({})
    x, y = inputs(model, s)
    eng = TTTEngine(model, steps=steps, backend=backend, students=s, compute_dtype=torch.bfloat16)
    eng.fit(x, y)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.fit(x, y)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key, t / 1e3, ev.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    return {"students": s, "total_kernel_ms": total,
            "top": [{"kernel": k[:120], "ms": ms, "share": ms / total, "calls": c} for k, ms, c in rows[:15]]}


# ---------------------------------------------------------------------------------------- end to end
def import_open_clip():
    try:
        from apm_fast._compat import import_open_clip as imp   # the package's guard, where present
        return imp()
    except ImportError:
        pass
    try:
        import open_clip
        return open_clip
    except RuntimeError:                                       # torchvision built for another torch
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
            except RuntimeError:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_open_clip._lib = lib
        import open_clip
        return open_clip


class OpenClipTeacher:
    """Minimal teacher over open_clip (the package's OpenCLIPTeacher is used where present)."""

    def __init__(self, oc, name):
        model, _, self.preprocess = oc.create_model_and_transforms(name, pretrained=None, device="cuda")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = oc.get_tokenizer(name)
        self.device = torch.device("cuda")

    @torch.no_grad()
    def embed_images(self, x):
        return self.model.encode_image(x).float()

    @torch.no_grad()
    def embed_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float()


def make_teacher(name="ViT-L-14"):
    try:
        import warnings

        from apm_fast.teachers import OpenCLIPTeacher
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return OpenCLIPTeacher(name, pretrained=None, device="cuda"), import_open_clip()
    except ImportError:
        oc = import_open_clip()
        return OpenClipTeacher(oc, name), oc


def make_jpegs(n, folder) -> list:
    """``n`` photo-sized JPEGs (500 x 375, smooth gradients plus noise) written to ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b + 2 * i), np.sin((xx + yy) * c)], -1)
        img = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)) * 255).clip(0, 255).astype(np.uint8)
        p = Path(folder) / f"img_{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


def end_to_end(backend, steps, n_images, students) -> dict:
    from PIL import Image

    teacher, oc = make_teacher("ViT-L-14")
    classes = list(getattr(oc, "IMAGENET_CLASSNAMES", [f"class {i}" for i in range(1000)]))
    model = model_for({})
    eng = TTTEngine(model, steps=steps, backend=backend, students=students, compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = make_jpegs(n_images, tmp)
        gen_s = time.perf_counter() - t0
        s = eng.students_for(n_images)
        warm = classify_images(files[:s], model, teacher, classes, engine=eng, progress=False)
        res = classify_images(files, model, teacher, classes, engine=eng, progress=True)
        # the teacher alone, same batch size, preprocessed tensors already on the device
        xb = torch.stack([teacher.preprocess(Image.open(f).convert("RGB")) for f in files[:s]]).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            teacher.embed_images(xb)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(3):
                teacher.embed_images(xb)
            torch.cuda.synchronize()
        teacher_ips = 3 * s / (time.perf_counter() - t1)
    return {"images": n_images, "students": res.students, "images_per_s": res.images_per_s,
            "seconds": res.seconds, "startup_seconds": warm.startup_seconds, "mode": res.mode,
            "teacher_only_ips": teacher_ips, "jpeg_generation_s": gen_s, "classes": len(classes),
            "finite": bool(torch.isfinite(res.logits).all())}


# ---------------------------------------------------------------------------------------- main
def section(results, key, fn, *args):
    t0 = time.perf_counter()
    try:
        results[key] = fn(*args)
    except Exception as exc:
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(f"[{key}] FAILED: {type(exc).__name__}: {exc}", flush=True)
    print(f"[{key}] {time.perf_counter() - t0:.1f} s", flush=True)
    torch.cuda.empty_cache()
    return results[key]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_engine.json", help="a .json file, or a folder for bench_engine.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--students", default="1,8,32,64", help="comma-separated S values for side by side")
    ap.add_argument("--backends", default="", help="comma-separated subset (default: every fused backend)")
    ap.add_argument("--e2e-images", type=int, default=512)
    ap.add_argument("--e2e-students", type=int, default=None, help="default: from free memory (at most 64)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="S in 1,8; 128 end-to-end images; 3 reps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_engine: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.students, args.e2e_images, args.reps = "1,8", 128, 3
    out = Path(args.out)
    out = out if out.suffix == ".json" else out / "bench_engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    cfg = preset("ttt-l14")
    res = {"machine": machine(), "workload": {"preset": "ttt-l14", "steps": args.steps, "dtype": "bf16",
                                              "state": "fp32 master/grad/m/v + bf16 copy"},
           "floors": floors(cfg, args.steps), "targets": TARGETS}
    names, unavailable = fused_backends([b for b in args.backends.split(",") if b])
    res["backends"], res["unavailable"] = names, unavailable
    print("machine:", json.dumps(res["machine"]), flush=True)
    print("backends:", names, "unavailable:", unavailable, flush=True)

    res["gate"], passed = {}, []
    for b in names:
        g = section(res["gate"], b, gate, b)
        if g.get("passed"):
            passed.append(b)
        print(f"  gate {b}: {json.dumps({k: v for k, v in g.items() if k != 'trace'})}", flush=True)
    res["latency"], res["memory"], res["side_by_side"] = {}, {}, {}
    s_list = [int(s) for s in args.students.split(",") if s]
    for b in passed:
        section(res["latency"], b, latency, b, args.steps, args.reps)
        section(res["memory"], b, one_student_memory, b, args.steps)
        probe = res["memory"][b].get("probe_per_student_gb")
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        max_s = int((free - 2e9) / (1.15 * probe * 1e9)) if probe else max(s_list)
        section(res["side_by_side"], b, side_by_side, b, args.steps, s_list, max_s)
    best = None
    for b in passed:
        sb = res["side_by_side"].get(b, {})
        ips = max((v.get("images_per_s", 0) for v in sb.values() if isinstance(v, dict)), default=0)
        if best is None or ips > best[1]:
            best = (b, ips)
    res["where_time_goes"] = {}
    if best:
        section(res["where_time_goes"], "S=1", where_time_goes, best[0], args.steps, 1)
        top_s = max([s for s in s_list if isinstance(res["side_by_side"][best[0]].get(str(s)), dict)
                     and "images_per_s" in res["side_by_side"][best[0]][str(s)]], default=1)
        section(res["where_time_goes"], f"S={top_s}", where_time_goes, best[0], args.steps, top_s)
        section(res, "end_to_end", end_to_end, best[0], args.steps, args.e2e_images, args.e2e_students)
        res["end_to_end_backend"] = best[0]
    res["wall_seconds"] = time.perf_counter() - wall
    out.write_text(json.dumps(res, indent=2, default=str))
    print_table(res)
    print(f"\nwrote {out} ({res['wall_seconds']:.0f} s)")
    return 0 if passed and len(passed) == len(names) else 1


def print_table(res):
    f = res["floors"]
    print(f"\n== TTT engine, ttt-l14 bf16, {res['workload']['steps']} steps — {res['machine']['gpu']}, "
          f"torch {res['machine']['torch']}, triton {res['machine']['triton']}, commit {res['machine']['commit']}")
    print(f"floors per step: compute {f['compute_floor_ms']:.3f} ms ({f['step_gflop']:.1f} GF at 738 TF/s) + "
          f"Adam traffic {f['adam_traffic_floor_ms']:.3f} ms ({ADAM_BYTES} B x {f['params'] / 1e6:.1f} M at 3 TB/s)"
          f" -> side by side <= {f['side_by_side_ceiling_ips']:.0f} images/s")
    print(f"{'backend':8} {'gate':5} {'graph ms/step':>13} {'eager ms/step':>13} {'TF/s':>6} "
          f"{'1 img ms':>8} {'1 student GB':>12}  side by side images/s (S: ips, GB/student)")
    for b in res["backends"]:
        g = res["gate"].get(b, {})
        lat, mem, sb = res["latency"].get(b, {}), res["memory"].get(b, {}), res["side_by_side"].get(b, {})
        gm = lat.get("graph", {}).get("median_ms", math.nan)
        em = lat.get("eager", {}).get("median_ms", math.nan)
        sbs = "  ".join(f"{s}: {v['images_per_s']:.0f}, {v['peak_gb_per_student']:.2f}"
                        for s, v in sb.items() if isinstance(v, dict) and "images_per_s" in v)
        print(f"{b:8} {'ok' if g.get('passed') else 'FAIL':5} {gm:13.3f} {em:13.3f} "
              f"{lat.get('tflops_graph', math.nan):6.0f} {lat.get('one_image_ms', math.nan):8.2f} "
              f"{mem.get('peak_gb', math.nan):12.3f}  {sbs}")
    e = res.get("end_to_end")
    if isinstance(e, dict) and "images_per_s" in e:
        print(f"end to end ({res.get('end_to_end_backend')}, ViT-L/14 random weights, {e['images']} JPEGs, "
              f"S = {e['students']}): {e['images_per_s']:.0f} images/s (teacher alone {e['teacher_only_ips']:.0f} "
              f"images/s; start-up {e['startup_seconds']:.1f} s)")
    elif e:
        print(f"end to end: {e.get('error')}")
    for k, w in res.get("where_time_goes", {}).items():
        if isinstance(w, dict) and "top" in w:
            print(f"where the time goes ({k}, one batch, {w['total_kernel_ms']:.1f} ms of kernels):")
            for r in w["top"][:8]:
                print(f"   {r['share'] * 100:5.1f} %  {r['ms']:8.2f} ms  {r['calls']:6d}x  {r['kernel'][:90]}")
    print("targets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items()))


if __name__ == "__main__":
    sys.exit(main())
