"""The kernels of three replayed steps (Triton table, ``ttt-l14``) under torch.profiler, per step:
the time of each kernel name summed, and the first step's kernels in order (start, duration).

    CASES=64:0,64:1,1:0,1:1 OUT=<folder> python3 profile_step.py

(S:overlap pairs; overlap 1: Adam beside the backward, the Triton table's default) writes
``<folder>/prof64.json``. ``profile-1d73e3a.json``: all four cases at 1d73e3a (before this
change); ``profile-d7aad43-S64.json``: 64:1 at d7aad43 (the position columns by their factors, the
Adam from factors by 32 x 128 tiles at every rank, later replaced)."""
import os, sys, json, statistics, torch
from torch.profiler import profile, ProfilerActivity
from apm_fast import APM, TestTimeTrainer, preset
out = os.environ.get("OUT", ".")
torch.manual_seed(0)
model = APM(preset("ttt-l14"), device="cuda")
px = model.config.image_size
res = []
import os as _os
CASES = [tuple(int(v) for v in c.split(":")) for c in _os.environ.get("CASES", "64:0,64:1,1:0,1:1").split(",")]
for S, overlap in [(s_, bool(o_)) for s_, o_ in CASES]:
    x = torch.randn(S, 3, px, px, device="cuda"); y = torch.randn(S, model.config.dim, device="cuda")
    t = TestTimeTrainer(model, steps=20, lr=1e-3, backend=os.environ.get("TABLE", "triton"), students=S, precision="bf16")
    t.engine.overlap = overlap
    t.fit(x, y); t.fit(x, y)
    ms = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); t.fit(x, y); b.record(); b.synchronize(); ms.append(a.elapsed_time(b))
    prog = t.engine._program
    prog.load(x, y)
    for _ in range(3): prog.step()
    torch.cuda.synchronize()
    N = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(N): prog.step()
        torch.cuda.synchronize()
    ev = sorted([(e.time_range.start, e.time_range.end - e.time_range.start, e.name) for e in prof.events()
                 if e.device_type.name == "CUDA"])
    t0 = ev[0][0]
    span = (max(s + d for s, d, _ in ev) - t0) / N
    agg = {}
    for s, d, n in ev:
        k = n[:90]; a = agg.setdefault(k, [0.0, 0]); a[0] += d / N; a[1] += 1
    top = sorted(agg.items(), key=lambda kv: -kv[1][0])
    r = {"S": S, "overlap": overlap, "fit_ms_median": statistics.median(ms), "img_s": S * 1e3 / statistics.median(ms),
         "span_us_per_step": span, "sum_us_per_step": sum(d for _, d, _ in ev) / N,
         "top": [(k, round(v[0], 1), v[1] // N) for k, v in top],
         "first_step": [(round(s - t0, 1), round(d, 1), n[:70]) for s, d, n in ev[: len(ev) // N]]}
    print(json.dumps({k: v for k, v in r.items() if k not in ("top", "first_step")}), flush=True)
    for k, us, c in r["top"][:40]:
        print(f"   {us:9.1f} us  x{c:3d}  {k}")
    res.append(r)
    del t, prog; torch.cuda.empty_cache()
json.dump(res, open(f"{out}/prof64.json", "w"), indent=1)
