"""Two changes of one image's step, each against the code before it:
* the Triton pool's merge of the forward's tile partials in column slices (bf61eb1; "whole": one
  program a row, as before): the forward alone at ttt-l14's shapes (1 and 64 students) and its
  error against float64;
* the loss gradient straight from the output product (its start made beside; "unfolded": z,
  then z - target and the scale, as before).
Then the engine's captured step at one image on both kernel tables with each variant, three
rounds. JSON lines to argv[1]."""
import json
import math
import sys

import torch
import triton.testing

from apm_fast import APM
from apm_fast.config import preset
from apm_fast.kernels import pool
import apm_fast.ttt.program as program
from apm_fast.ops.contract import TorchPrimitives
from apm_fast.ttt.trainer import TestTimeTrainer

out = open(sys.argv[1], "w")
dev = torch.device("cuda")
REF = TorchPrimitives()
SLICED = pool.combine_slices
FORWARD = program.forward


def unfolded(*args, minus=None, alpha=1.0, **kw):
    z, f, ctx = FORWARD(*args, **kw)
    if minus is None:
        return z, f, ctx
    return ((z[:, 0] - minus) * alpha).unsqueeze(1), f, ctx


def whole(programs, D, block_p, sms):
    return min(pool.next_pow2(D), max(16, 8192 // block_p)), D


def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


L, D, H = 1024, 768, 8
scale = 1.0 / math.sqrt(D // H)
for S in (1, 64):
    torch.manual_seed(0)
    f = (torch.randn(S, 1, L, D, device=dev) * 0.5).to(torch.bfloat16)
    pos = (torch.randn(L, D, device=dev) * 0.5).to(torch.bfloat16)
    kt = torch.randn(S, H, D, device=dev) * 0.05
    sbar64, lse64 = REF.pool_fwd(f.double(), pos.double(), kt.double(), scale)
    for name, fn in (("sliced", SLICED), ("whole", whole)) * 2:
        pool.combine_slices = fn
        sbar, lse = pool.pool_fwd(f, pos, kt, scale)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20):
                pool.pool_fwd(f, pos, kt, scale)
        t = triton.testing.do_bench(g.replay, warmup=10, rep=200) / 20
        emit(what="pool_fwd", S=S, merge=name, us=1e3 * t, err_sbar=rel(sbar, sbar64), err_lse=rel(lse, lse64))
pool.combine_slices = SLICED

cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
x = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=dev)
y = torch.randn(1, cfg.dim, device=dev)
VARIANTS = {"new": (SLICED, FORWARD), "whole": (whole, FORWARD), "unfolded": (SLICED, unfolded)}
order = 0
for rnd in range(3):
    for table in ("triton", "cuda"):
        for name, (merge, fwd) in VARIANTS.items():
            if table == "cuda" and name == "whole":
                continue
            pool.combine_slices, program.forward = merge, fwd
            tr = TestTimeTrainer(model, steps=20, backend=table, students=1, precision=torch.bfloat16)
            prog = tr.program(1)
            prog.load(x, y)
            ts = []
            for i in range(11):
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
            cls = tr.fit(x, y).cls
            emit(what="engine", round=rnd, order=order, table=table, variant=name, S=1,
                 ms_per_step=ts[len(ts) // 2], ms_min=ts[0], loss_last=float(prog.losses[0, -1]),
                 cls_head=[float(v) for v in cls.flatten()[:4]])
            order += 1
            del tr, prog
            torch.cuda.empty_cache()
program.forward = FORWARD
pool.combine_slices = SLICED
emit(what="done")
