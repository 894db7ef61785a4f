"""Micro-benchmark (CUDA graphs) of the cuda Adam variants (APM_FAST_ADAM_MODE, APM_FAST_ADAM_GRID)
on the one-image step's real launches (ttt-l14): the trigger block from rank-1 factors and the
position block written (rows of 1024 of 2048), the lowp flat group (11.3 M), the fp32 rest (2.4 M);
Triton's kernel on the same. Writes $OUT/adam_modes.json."""
import json, os, types, torch
from apm_fast.backends.cuda import CudaPrimitives
from apm_fast.backends.triton import TritonPrimitives
from apm_fast.bench.timing import measure_graph

dev = "cuda"


def timed(fn):
    """us per call, the harness's graph timing (the run's copy of this script had the same loop
    inline: 4 calls a graph, the median of 15 replays)."""
    return measure_graph(fn, device=dev, inner=4).median_ms * 1000


def step_launches(dev):
    """The one-image step's four Adam launches (ttt-l14) on fresh buffers: a namespace with the
    buffers, ``blk`` (a block of the first layer's columns) and ``cases`` (name -> fn(table))."""
    N1, NL, NF = 4096 * 2048, 11_300_000, 2_400_000
    P = torch.randn(N1 + NL + NF, device=dev); G = torch.randn_like(P) * 1e-3
    M = torch.zeros_like(P); V = torch.zeros_like(P); LP = torch.zeros(N1 + NL, device=dev, dtype=torch.bfloat16)
    step = torch.full((1,), 7.0, device=dev); lr = torch.full((1,), 1e-3, device=dev)
    a = torch.randn(1, 1, 4096, device=dev); b = torch.randn(1, 1, 1024, device=dev)

    def blk(t, lo, hi):
        return t[:N1].view(1, 4096, 2048)[:, :, lo:hi]

    cases = {
        "trigger_rank1": lambda pr: pr.adam_(blk(P, 0, 1024), None, blk(M, 0, 1024), blk(V, 0, 1024), step, lr, 0.9,
                                            0.999, 1e-8, lowp=blk(LP, 0, 1024), outer=(a, b)),
        "position_written": lambda pr: pr.adam_(blk(P, 1024, 2048), blk(G, 1024, 2048), blk(M, 1024, 2048),
                                               blk(V, 1024, 2048), step, lr, 0.9, 0.999, 1e-8,
                                               lowp=blk(LP, 1024, 2048)),
        "flat_lowp": lambda pr: pr.adam_(P[N1:N1 + NL].view(1, -1), G[N1:N1 + NL].view(1, -1),
                                        M[N1:N1 + NL].view(1, -1), V[N1:N1 + NL].view(1, -1), step, lr, 0.9, 0.999,
                                        1e-8, lowp=LP[N1:].view(1, -1)),
        "flat_fp32": lambda pr: pr.adam_(P[N1 + NL:].view(1, -1), G[N1 + NL:].view(1, -1), M[N1 + NL:].view(1, -1),
                                        V[N1 + NL:].view(1, -1), step, lr, 0.9, 0.999, 1e-8),
    }
    return types.SimpleNamespace(P=P, G=G, M=M, V=V, LP=LP, step=step, lr=lr, a=a, b=b, blk=blk, cases=cases)


if __name__ == "__main__":
    L = step_launches(dev)
    cases, step, lr, a, b = L.cases, L.step, L.lr, L.a, L.b
    res = {}
    tr, cu = TritonPrimitives(), CudaPrimitives()
    for name, fn in cases.items():
        res[f"triton/{name}"] = timed(lambda: fn(tr))
    for mode, grid in (("0", "r"), ("1", "r"), ("2", "r"), ("3", "r"), ("1", "t"), ("2", "t"), ("0", "r"), ("3", "r")):
        os.environ["APM_FAST_ADAM_MODE"], os.environ["APM_FAST_ADAM_GRID"] = mode, grid
        for name, fn in cases.items():
            res[f"cuda/m{mode}{grid}/{name}"] = res.get(f"cuda/m{mode}{grid}/{name}", []) + [timed(lambda: fn(cu))]
    # correctness of each mode against mode 0 (one update from the same state)
    ref = None
    for mode, grid in (("0", "r"), ("1", "r"), ("2", "t"), ("3", "r")):
        os.environ["APM_FAST_ADAM_MODE"], os.environ["APM_FAST_ADAM_GRID"] = mode, grid
        torch.manual_seed(0)
        p = torch.randn(1, 4096, 2048, device=dev); m = torch.zeros_like(p); v = torch.zeros_like(p)
        g = torch.randn_like(p)
        for _ in range(3):
            cu.adam_(p[:, :, 1024:], g[:, :, 1024:], m[:, :, 1024:], v[:, :, 1024:], step, lr, 0.9, 0.999, 1e-8)
            cu.adam_(p[:, :, :1024], None, m[:, :, :1024], v[:, :, :1024], step, lr, 0.9, 0.999, 1e-8, outer=(a, b))
        torch.cuda.synchronize()
        if ref is None:
            ref = p.clone()
        res[f"maxdiff/m{mode}{grid}"] = (p - ref).abs().max().item()
    tot = {}
    for k, v in res.items():
        if k.startswith("cuda/") or k.startswith("triton/"):
            key = k.rsplit("/", 1)[0]
            tot[key] = tot.get(key, 0) + (min(v) if isinstance(v, list) else v)
    res["total"] = tot
    for k, v in res.items():
        print(k, v)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "adam_modes.json"), "w"), indent=1)
