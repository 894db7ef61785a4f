"""Adam alone (the graph of each call not captured: at one image the timing includes the launch) on both kernel tables: fp32 against bf16 moments, the flat group of ttt-l14 (19.66 M
parameters with a bf16 copy) at 1 and 64 students, at a later update (step 2): ms and TB/s."""
import json, sys, torch
from apm_fast.backends import get_backend

def ev_time(fn, reps=15):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]

dev = "cuda"
N = 19_660_000
out = []
for S in (1, 64):
    p = torch.randn(S, N, device=dev) * 0.02
    g = torch.randn(S, N, device=dev) * 1e-3
    lowp = torch.empty(S, N, device=dev, dtype=torch.bfloat16)
    step = torch.full((1,), 2.0, device=dev); lr = torch.full((1,), 1e-4, device=dev)
    for mdt in (torch.float32, torch.bfloat16):
        m = torch.zeros(S, N, device=dev, dtype=mdt); v = torch.zeros(S, N, device=dev, dtype=mdt)
        for name in ("triton", "cuda"):
            prim = get_backend(name, device=dev)
            fn = lambda: prim.adam_(p, g, m, v, step, lr, 0.9, 0.999, 1e-8, lowp=lowp)
            ms = ev_time(fn)
            by = S * N * (14 + 4 * m.element_size())   # p read and written, g read, the copy written; m, v both ways
            r = dict(table=name, S=S, moments=str(mdt).split(".")[-1], ms=round(ms, 4), tbs=round(by / ms / 1e9, 3))
            print(r, flush=True); out.append(r)
        del m, v
    # a plain device copy of the same bytes as the fp32 case, for scale
    big = torch.empty(S * N * 15 // 2, device=dev, dtype=torch.float32); big2 = torch.empty_like(big)
    ms = ev_time(lambda: big2.copy_(big))
    r = dict(table="copy", S=S, ms=round(ms, 4), tbs=round(2 * big.numel() * 4 / ms / 1e9, 3)); print(r); out.append(r)
    del p, g, lowp, big, big2
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1)
