"""Micro-benchmark (CUDA graphs): the cuda table's first-layer input gradient three ways (at 89f6437,
where the binding took the route from APM_FAST_FIRST_INPUT; e14aefc ran the Adam part alone), and the
Adam of a first-layer column block (ttt-l14) on both kernel tables against a flat buffer of the
same size. Writes $OUT/first_bench.json."""
import json, os, torch
from apm_fast.backends.cuda import CudaPrimitives
from apm_fast.backends.triton import TritonPrimitives

dev = "cuda"
res = {}


def timed(fn, reps=20, inner=5):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for _ in range(inner):
                fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / inner)
    ts.sort()
    return ts[len(ts) // 2]


cu = CudaPrimitives()
for S in (1, 64):
    L, H, N = 1024, 4096, 2048
    gen = torch.Generator(device=dev).manual_seed(0)
    p = torch.randn(S, L, H, device=dev, generator=gen).bfloat16()
    u = torch.randn(S, 1, H, device=dev, generator=gen)
    w = (torch.randn(S, N, H, device=dev, generator=gen) * H ** -0.5).bfloat16()
    dy = torch.randn(S, L, N, device=dev, generator=gen).bfloat16()
    outs = {}
    for route in ("act", "mask", "sums"):     # the switch APM_FAST_FIRST_INPUT existed at 89f6437 only
        os.environ["APM_FAST_FIRST_INPUT"] = route
        outs[route] = [t.clone() for t in cu.first_layer_bwd_input(dy, w, p, u)]
        res[f"first_input/S={S}/{route}_us"] = timed(lambda: cu.first_layer_bwd_input(dy, w, p, u))
    for route in ("mask", "sums"):
        res[f"first_input/S={S}/{route}_g1_equal"] = bool(torch.equal(outs[route][0], outs["act"][0]))
        r0, r1 = outs["act"][1].double(), outs[route][1].double()
        res[f"first_input/S={S}/{route}_r_rel"] = float((r1 - r0).norm() / r0.norm())
    os.environ["APM_FAST_FIRST_INPUT"] = "sums"
    print({k: v for k, v in res.items() if f"S={S}" in k}, flush=True)
    del p, u, w, dy, outs

tr = TritonPrimitives()
for S in (1, 64):
    R, W, C = 4096, 1536, 768
    step = torch.ones(1, device=dev); lr = torch.full((1,), 1e-3, device=dev)
    for name, prim in (("cuda", cu), ("triton", tr)):
        P = torch.randn(S, R, W, device=dev); M = torch.zeros_like(P); V = torch.zeros_like(P)
        LP = torch.empty(S, R, W, device=dev, dtype=torch.bfloat16); G = torch.randn(S, R, W, device=dev)
        blk = [t[:, :, :C] for t in (P, G, M, V, LP)]
        a = torch.randn(S, 1, R, device=dev); b = torch.randn(S, 1, C, device=dev)
        res[f"adam/S={S}/{name}/block_written_us"] = timed(lambda: prim.adam_(blk[0], blk[1], blk[2], blk[3], step, lr, 0.9, 0.999, 1e-8, lowp=blk[4]))
        res[f"adam/S={S}/{name}/block_rank1_us"] = timed(lambda: prim.adam_(blk[0], None, blk[2], blk[3], step, lr, 0.9, 0.999, 1e-8, lowp=blk[4], outer=(a, b)))
        a32 = torch.randn(S, 32, R, device=dev); b32 = torch.randn(S, 32, C // 2, device=dev)
        half = [t[:, :, :C // 2] for t in (P, G, M, V, LP)]
        res[f"adam/S={S}/{name}/half_rank32_us"] = timed(lambda: prim.adam_(half[0], None, half[2], half[3], step, lr, 0.9, 0.999, 1e-8, lowp=half[4], outer=(a32, b32)))
        flat = [t.reshape(-1)[: S * R * C].view(1, -1) for t in (P, G, M, V, LP)]
        res[f"adam/S={S}/{name}/flat_written_us"] = timed(lambda: prim.adam_(flat[0], flat[1], flat[2], flat[3], step, lr, 0.9, 0.999, 1e-8, lowp=flat[4]))
        del P, M, V, LP, G
    print({k: v for k, v in res.items() if f"adam/S={S}" in k}, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "first_bench.json"), "w"), indent=1)
