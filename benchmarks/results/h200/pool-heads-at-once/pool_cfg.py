"""The new Triton pool's rows per program, D slice, warps and product precision, each timed as 20
calls captured in one CUDA graph (no host in the way), at ttt-l14's shapes for 1 and 64 students;
the old kernels the same way. JSON lines to argv[1]."""
import json
import math
import sys
import time

import torch
import triton

from apm_fast.kernels import pool as new
from apm_fast.kernels import pool_old as old
from apm_fast.ops.contract import TorchPrimitives

out = open(sys.argv[1], "w")
dev = torch.device("cuda")
REF = TorchPrimitives()


def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def graph_us(fn, n=20):
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n)
    ts.sort()
    return ts[len(ts) // 2]


L, D, H = 1024, 768, 8
scale = 1.0 / math.sqrt(D // H)
old.autotune_enabled = lambda: False
new.autotune_enabled = lambda: False
t0 = time.time()
for S in (1, 64):
    torch.manual_seed(0)
    f = (torch.randn(S, 1, L, D, device=dev) * 0.5).to(torch.bfloat16)
    pos = (torch.randn(L, D, device=dev) * 0.5).to(torch.bfloat16)
    kt = torch.randn(S, H, D, device=dev) * 0.05
    ds = torch.randn(S, 1, H, D, device=dev)
    sbar64, lse64 = REF.pool_fwd(f.double(), pos.double(), kt.double(), scale)
    df64, dkt64 = REF.pool_bwd(f.double(), pos.double(), kt.double(), scale, sbar64, lse64, ds.double())
    sb32, ls32 = sbar64.float(), lse64.float()
    emit(what="old", S=S, fwd_us=graph_us(lambda: old.pool_fwd(f, pos, kt, scale)),
         bwd_us=graph_us(lambda: old.pool_bwd(f, pos, kt, scale, sb32, ls32, ds)))
    best = {}
    for prec in ("tf32", "tf32x3"):
        new._prec = lambda f_, p=prec: p
        for bl in (16, 32, 64):
            new.choose_block_l = lambda S_, B_, L_, dev_, nsplit=None, b=bl: b
            for bk in (32, 64, 128, 256):
                for warps in (4, 8):
                    if bl * bk > 8192 or (prec == "tf32x3" and bk == 32):
                        continue
                    cfg = triton.Config({"BLOCK_K": bk}, num_warps=warps, num_stages=2)
                    new._rank = lambda cfgs, args, c=cfg: [c]
                    try:
                        sbar, lse = new.pool_fwd(f, pos, kt, scale)
                        df, dkt = new.pool_bwd(f, pos, kt, scale, sb32, ls32, ds)
                        tf = graph_us(lambda: new.pool_fwd(f, pos, kt, scale))
                        tb = graph_us(lambda: new.pool_bwd(f, pos, kt, scale, sb32, ls32, ds))
                    except Exception as e:  # noqa
                        emit(what="new", S=S, prec=prec, bl=bl, bk=bk, warps=warps, error=repr(e)[:300])
                        continue
                    emit(what="new", S=S, prec=prec, bl=bl, bk=bk, warps=warps, fwd_us=tf, bwd_us=tb,
                         err_sbar=rel(sbar, sbar64), err_df=rel(df, df64), err_dkt=rel(dkt, dkt64))
emit(what="done", s=time.time() - t0)
