"""The cuda table's pool with its 64-row tiles on the tensor cores (pool_mma.cu) against its
row-per-warp tile kernels, and the Triton pool: the kernels alone at ttt-l14's shapes (1 and 64
students; each 20 times in one CUDA graph), their error against float64, then the engine's
captured step (cuda table) at 1 and 64 students with each, in turns. The switch is of this
experiment only (APM_FAST_POOL_MMA=0: the row-per-warp kernels at 64 rows too).
python3 cuda_pool_ab2.py OUT.jsonl"""
import json
import math
import os
import sys

import torch

from apm_fast import APM
from apm_fast.backends.cuda import CudaPrimitives
from apm_fast.config import preset
from apm_fast.kernels import pool as tpool
from apm_fast.ops.contract import TorchPrimitives
from apm_fast.ttt.trainer import TestTimeTrainer

out = open(sys.argv[1], "a")
dev = torch.device("cuda")
REF = TorchPrimitives()
CP = CudaPrimitives()
VARIANTS = {"row-per-warp": {"APM_FAST_POOL_MMA": "0"}, "mma": {"APM_FAST_POOL_MMA": "1"}}


def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def graph_us(fn, n=20, reps=5):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(ts)[len(ts) // 2]


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
    runs = [("triton", {}, tpool.pool_fwd, tpool.pool_bwd)] + \
        [(k, v, CP.pool_fwd, CP.pool_bwd) for k, v in VARIANTS.items()]
    for name, env, fw, bw in runs:
        os.environ.update(env)
        sbar, lse = fw(f, pos, kt, scale)
        df, dkt = bw(f, pos, kt, scale, sb32, ls32, ds)
        t_f = graph_us(lambda: fw(f, pos, kt, scale))
        t_b = graph_us(lambda: bw(f, pos, kt, scale, sb32, ls32, ds))
        emit(what="kernels", S=S, pool=name, fwd_us=t_f, bwd_us=t_b, err_sbar=rel(sbar, sbar64),
             err_lse=rel(lse, lse64), err_df=rel(df, df64), err_dkt=rel(dkt, dkt64))

cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
order = ["mma", "row-per-warp", "mma", "row-per-warp"]
for turn, name in enumerate(order):
    os.environ.update(VARIANTS[name])
    for S in (1, 64):
        g = torch.Generator(device=dev).manual_seed(S)
        x = torch.randn(S, 3, cfg.image_size, cfg.image_size, device=dev, generator=g)
        y = torch.randn(S, cfg.dim, device=dev, generator=g)
        tr = TestTimeTrainer(model, steps=20, backend="cuda", students=S, precision=torch.bfloat16)
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
        res = tr.fit(x, y)
        emit(what="engine", turn=turn, pool=name, S=S, ms_per_step=ms, steps_img_s=S / (20 * ms * 1e-3),
             cls_norm=float(res.cls.float().norm()), loss_last=float(res.losses[:, -1].float().mean()))
        del tr, prog, res
        torch.cuda.empty_cache()
emit(what="done")
