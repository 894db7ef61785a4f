"""The pool's per-head fp32 products (Primitives.heads_product: the plain form, contract.heads_product,
and the Triton table's kernels, kernels/heads.py) and other torch forms,
at ttt-l14's shapes (S = 64 and 1 students, one image, 8 heads, D = 768, w a third of the
in-projection as the step reads it): each checked against the current form, then timed alone in
a CUDA graph (20 calls a replay). The 4ba7553 profile at 64 students had cuBLAS's gemmSN_NN at
0.30 ms a call (41 calls: _cols_of_heads in the forward and the query gradient) and gemmSN_TN at
0.10 ms (_rows_of_heads), against ~0.036 ms to read the 151 MB of w once. JSON lines to argv[1]."""
import json
import sys

import torch
import triton.testing

from apm_fast.ops import contract
from apm_fast.kernels import heads as hk

out = open(sys.argv[1], "w")
dev = torch.device("cuda")


def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()
    print(json.dumps(kw), flush=True)


def cols_transposed(x, w):
    s, n, h, dim = x.shape
    dh = dim // h
    r = torch.bmm(w, x.reshape(s, n * h, dim).transpose(1, 2))            # s, (h dh), (n h)
    r = r.view(s, h, dh, n, h).diagonal(dim1=1, dim2=4)                     # s, dh, n, h
    return r.permute(0, 2, 3, 1)


def cols_per_head(x, w):
    s, n, h, dim = x.shape
    dh = dim // h
    return torch.stack([torch.bmm(x[:, :, i, :], w[:, i * dh:(i + 1) * dh, :].transpose(1, 2)) for i in range(h)],
                       dim=2)


def cols_einsum(x, w):
    s, n, h, dim = x.shape
    return torch.einsum("shdk,snhk->snhd", w.reshape(s, h, dim // h, dim), x)


def cols_whole_in_proj(x, w, full, third):
    """every head of the whole in-projection (S 3H batches of dh x D, a uniform stride), one
    batched product; the third's heads kept"""
    s, n, h, dim = x.shape
    dh = dim // h
    wb = full.view(s * 3 * h, dh, dim)                                       # a view: uniform batch stride
    xb = x.permute(0, 2, 3, 1).reshape(s, h, dim, n)
    xb = torch.cat([xb] * 3, dim=1).reshape(s * 3 * h, dim, n)
    r = torch.bmm(wb, xb).view(s, 3, h, dh, n)[:, third]                     # s, h, dh, n
    return r.permute(0, 3, 1, 2)


def rows_per_head(x, w):
    s, n, h, dh = x.shape
    return torch.stack([torch.bmm(x[:, :, i, :], w[:, i * dh:(i + 1) * dh, :]) for i in range(h)], dim=2)


def rows_transposed(x, w):
    s, n, h, dh = x.shape
    r = torch.bmm(w.transpose(1, 2), contract.head_blocks(x).transpose(1, 2))   # s, D, (n h)
    return r.transpose(1, 2).reshape(s, n, h, -1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


D, H = 768, 8
for S in (64, 1):
    torch.manual_seed(0)
    full = torch.randn(S, 3 * D, D, device=dev) * 0.03
    wq, wk, wv = full.chunk(3, dim=1)
    x = torch.randn(S, 1, H, D, device=dev)
    xh = torch.randn(S, 1, H, D // H, device=dev)
    cases = [("cols", "current", lambda: contract.heads_product(x, wv, True)),
             ("cols", "kernel", lambda: hk.heads_product(x, wv, True)),
             ("cols", "transposed", lambda: cols_transposed(x, wv)),
             ("cols", "per_head", lambda: cols_per_head(x, wv)),
             ("cols", "einsum", lambda: cols_einsum(x, wv)),
             ("cols", "whole_in_proj", lambda: cols_whole_in_proj(x, wv, full, 2)),
             ("rows", "current", lambda: contract.heads_product(xh, wv)),
             ("rows", "kernel", lambda: hk.heads_product(xh, wv)),
             ("rows", "per_head", lambda: rows_per_head(xh, wv)),
             ("rows", "transposed", lambda: rows_transposed(xh, wv))]
    ref = {"cols": contract.heads_product(x.double(), wv.double(), True),
           "rows": contract.heads_product(xh.double(), wv.double())}
    for rnd in range(2):
        for kind, name, fn in cases:
            try:
                err = rel(fn(), ref[kind])
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(20):
                        fn()
                us = 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=100) / 20
                emit(S=S, round=rnd, fn=kind, form=name, us=us, rel_err=err)
            except Exception as exc:        # a form that cannot run here: say why, go on
                emit(S=S, round=rnd, fn=kind, form=name, error=f"{type(exc).__name__}: {exc}"[:300])

# the engine's captured step on the Triton table with its kernels against the plain form, in turns
from apm_fast import APM
from apm_fast.backends.triton import TritonPrimitives
from apm_fast.config import preset
from apm_fast.ttt.trainer import TestTimeTrainer

KERNEL = TritonPrimitives._heads_product
PLAIN = contract.Primitives._heads_product
cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
for S in (64, 1):
    x = torch.randn(S, 3, cfg.image_size, cfg.image_size, device=dev)
    y = torch.randn(S, cfg.dim, device=dev)
    for rnd in range(2):
        for name, impl in (("kernel", KERNEL), ("plain", PLAIN)):
            TritonPrimitives._heads_product = impl
            tr = TestTimeTrainer(model, steps=20, backend="triton", students=S, precision=torch.bfloat16)
            prog = tr.program(S)
            prog.load(x, y)
            ts = []
            for i in range(6 if S > 1 else 11):
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
            emit(what="engine", S=S, round=rnd, impl=name, ms_per_step=ts[len(ts) // 2], ms_min=ts[0],
                 images_per_s=S / (20 * ts[len(ts) // 2] / 1e3), loss_last=float(prog.losses[0, -1]))
            del tr, prog
            torch.cuda.empty_cache()
TritonPrimitives._heads_product = KERNEL
emit(what="done")
