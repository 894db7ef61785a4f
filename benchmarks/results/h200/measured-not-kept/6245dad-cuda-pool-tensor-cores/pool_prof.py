"""Per-kernel times (torch.profiler) of the cuda and Triton pools at ttt-l14's shapes, 1 and 64 students, 10 calls
each: python3 pool_prof.py OUT.jsonl (POOL_LABEL names the cuda rows)."""
import json, math, os, sys
import torch
from torch.profiler import profile, ProfilerActivity
from apm_fast.backends.cuda import CudaPrimitives
from apm_fast.kernels import pool as tpool
CP = CudaPrimitives()
dev = torch.device("cuda")
L, D, H = 1024, 768, 8
scale = 1.0 / math.sqrt(D // H)
out = open(sys.argv[1], "a")
for S in (64, 1):
    torch.manual_seed(0)
    f = (torch.randn(S, 1, L, D, device=dev) * 0.5).to(torch.bfloat16)
    pos = (torch.randn(L, D, device=dev) * 0.5).to(torch.bfloat16)
    kt = torch.randn(S, H, D, device=dev) * 0.05
    ds = torch.randn(S, 1, H, D, device=dev)
    sb, ls = CP.pool_fwd(f, pos, kt, scale)
    for name, env, fw, bw in [(os.environ.get("POOL_LABEL", "cuda"), {}, CP.pool_fwd, CP.pool_bwd),
                              ("triton", {}, tpool.pool_fwd, tpool.pool_bwd)]:
        os.environ.update(env)
        for _ in range(3):
            fw(f, pos, kt, scale); bw(f, pos, kt, scale, sb, ls, ds)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fw(f, pos, kt, scale); bw(f, pos, kt, scale, sb, ls, ds)
            torch.cuda.synchronize()
        rows = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = e.name[:110]
                r = rows.setdefault(k, [0.0, 0])
                r[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                r[1] += 1
        for k, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
            row = dict(S=S, pool=name, kernel=k, us_per_call=us / n, calls=n)
            out.write(json.dumps(row) + "\n"); print(json.dumps(row), flush=True)
