"""The Triton pool, new (every head at once on tensor cores) against old (one head a program,
CUDA cores): the kernels alone at ttt-l14's shapes (1 and 64 students), their error against float64,
then the engine's captured step (triton table) at 1 and 64 students with each, order new, old, new,
old. JSON lines to argv[1]."""
import json
import math
import sys

import torch
import triton.testing

from apm_fast import APM
from apm_fast.config import preset
from apm_fast.kernels import pool as new
from apm_fast.kernels import pool_old as old
from apm_fast.ops.contract import TorchPrimitives
from apm_fast.ttt.trainer import TestTimeTrainer

out = open(sys.argv[1], "w")
dev = torch.device("cuda")
REF = TorchPrimitives()


def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


NEW = (new.pool_fwd, new.pool_bwd)
OLD = (old.pool_fwd, old.pool_bwd)
L, D, H = 1024, 768, 8
scale = 1.0 / math.sqrt(D // H)
for S in (1, 64):
    torch.manual_seed(0)
    f = (torch.randn(S, 1, L, D, device=dev) * 0.5).to(torch.bfloat16)
    pos = (torch.randn(L, D, device=dev) * 0.5).to(torch.bfloat16)
    kt = torch.randn(S, H, D, device=dev) * 0.05
    ds = torch.randn(S, 1, H, D, device=dev)
    sbar64, lse64 = REF.pool_fwd(f.double(), pos.double(), kt.double(), scale)
    df64, dkt64 = REF.pool_bwd(f.double(), pos.double(), kt.double(), scale, sbar64, lse64, ds.double())
    sb32, ls32 = sbar64.float(), lse64.float()
    for name, (fw, bw) in (("new", NEW), ("old", OLD)):
        sbar, lse = fw(f, pos, kt, scale)
        df, dkt = bw(f, pos, kt, scale, sb32, ls32, ds)
        t_f = triton.testing.do_bench(lambda: fw(f, pos, kt, scale), warmup=25, rep=200)
        t_b = triton.testing.do_bench(lambda: bw(f, pos, kt, scale, sb32, ls32, ds), warmup=25, rep=200)
        emit(what="kernels", S=S, pool=name, fwd_us=1e3 * t_f, bwd_us=1e3 * t_b, err_sbar=rel(sbar, sbar64),
             err_lse=rel(lse, lse64), err_df=rel(df, df64), err_dkt=rel(dkt, dkt64))

cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
for order, (name, (fw, bw)) in enumerate([("new", NEW), ("old", OLD), ("new", NEW), ("old", OLD)]):
    new.pool_fwd, new.pool_bwd = fw, bw          # what the triton table calls
    for S in (1, 64):
        x = torch.randn(S, 3, cfg.image_size, cfg.image_size, device=dev)
        y = torch.randn(S, cfg.dim, device=dev)
        tr = TestTimeTrainer(model, steps=20, backend="triton", students=S, precision=torch.bfloat16)
        prog = tr.program(S)
        prog.load(x, y)
        ts = []
        for i in range(11 if S == 1 else 4):
            prog.reset()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(20):
                prog.step()
            b.record()
            b.synchronize()
            if i:
                ts.append(a.elapsed_time(b) / 20)
        ts.sort()
        ms = ts[len(ts) // 2]
        cls = tr.fit(x[:S], y[:S]).cls
        emit(what="engine", order=order, pool=name, S=S, ms_per_step=ms, steps_img_s=S / (20 * ms * 1e-3),
             cls_norm=float(cls.float().norm()), cls_head=[float(v) for v in cls.flatten()[:4]])
        del tr, prog
        torch.cuda.empty_cache()
new.pool_fwd, new.pool_bwd = NEW
emit(what="done")
