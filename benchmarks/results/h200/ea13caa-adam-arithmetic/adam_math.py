"""Micro-benchmark (CUDA graphs, the harness's measure_graph) of the cuda Adam's arithmetic:
IEEE division and square root (APM_FAST_ADAM_MATH unset) against the Triton kernel's
approximations (div.full.f32, sqrt.approx.ftz.f32; APM_FAST_ADAM_MATH=1, a switch of that
experiment's build only), on the one-image step's four real launches (ttt-l14: the trigger block
from rank-1 factors, the position block written, the lowp flat group 11.3 M, the fp32 rest 2.4 M),
the position block's halves from rank-32 factors (the tiles kernel), and the lowp flat group at
64 students; Triton's kernel on the same. Then each mode's parameters after three updates against
float64 torch.optim.Adam's and against Triton's. Writes $OUT/adam_math.json."""
import json, os, sys, torch
from apm_fast.backends.cuda import CudaPrimitives
from apm_fast.backends.triton import TritonPrimitives
from apm_fast.bench.timing import measure_graph

dev = "cuda"


def timed(fn, inner=4):
    return measure_graph(fn, device=dev, inner=inner).median_ms * 1000


# the four launches as 4074410's A/B defined them (the run's copy of this script had them inline)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "4074410-cuda-adam-coefficients"))
from adam_modes import step_launches  # noqa: E402

L = step_launches(dev)
P, M, V, LP, step, lr, blk = L.P, L.M, L.V, L.LP, L.step, L.lr, L.blk
a32 = torch.randn(1, 32, 4096, device=dev); b32 = torch.randn(1, 32, 512, device=dev)
S64, NL = 64, 11_300_000
P64 = torch.randn(S64, NL, device=dev); G64 = torch.randn_like(P64) * 1e-3
M64 = torch.zeros_like(P64); V64 = torch.zeros_like(P64); L64 = torch.zeros(S64, NL, device=dev, dtype=torch.bfloat16)

cases = dict(L.cases)
cases["position_half_rank32"] = lambda pr: pr.adam_(blk(P, 1024, 1536), None, blk(M, 1024, 1536), blk(V, 1024, 1536),
                                                    step, lr, 0.9, 0.999, 1e-8, lowp=blk(LP, 1024, 1536),
                                                    outer=(a32, b32))
cases["flat_lowp_S64"] = lambda pr: pr.adam_(P64, G64, M64, V64, step, lr, 0.9, 0.999, 1e-8, lowp=L64)
FOUR = ("trigger_rank1", "position_written", "flat_lowp", "flat_fp32")
res = {}
tr, cu = TritonPrimitives(), CudaPrimitives()
for name, fn in cases.items():
    res[f"triton/{name}"] = timed(lambda: fn(tr), inner=1 if name.endswith("S64") else 4)
for mode in ("0", "1", "0", "1"):
    os.environ["APM_FAST_ADAM_MATH"] = mode
    for name, fn in cases.items():
        key = f"cuda/math{mode}/{name}"
        res[key] = res.get(key, []) + [timed(lambda: fn(cu), inner=1 if name.endswith("S64") else 4)]
res["four_launches_us"] = {k: sum(min(v) if isinstance(v, list) else v for kk, v in res.items()
                                  if kk.startswith(k + "/") and kk.rsplit("/", 1)[1] in FOUR)
                           for k in ("triton", "cuda/math0", "cuda/math1")}
# accuracy: three updates of a (2, 100003) buffer and of the first layer's blocks, each mode against
# float64 torch.optim.Adam (the written gradient) and against the Triton table
torch.manual_seed(0)
p0 = torch.randn(2, 100_003, device=dev)
gs = [torch.randn_like(p0) * (i + 1) for i in range(3)]
ref = p0.double().clone().requires_grad_()
opt = torch.optim.Adam([ref], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
for g in gs:
    ref.grad = g.double(); opt.step()
out = {}
for name, pr, mode in (("triton", tr, "0"), ("cuda/math0", cu, "0"), ("cuda/math1", cu, "1")):
    os.environ["APM_FAST_ADAM_MATH"] = mode
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    st = torch.zeros(1, device=dev); lr2 = torch.full((1,), 1e-2, device=dev)
    for g in gs:
        st += 1
        pr.adam_(p, g, m, v, st, lr2, 0.9, 0.999, 1e-8)
    torch.cuda.synchronize()
    out[name] = p
    d = (p.double() - ref.detach())
    res[f"vs_float64/{name}"] = {"max_abs": d.abs().max().item(),
                                 "max_rel_to_update": (d.abs() / (ref.detach() - p0.double()).abs().clamp_min(1e-30)).max().item()}
res["cuda_math1_vs_triton_max_abs"] = (out["cuda/math1"] - out["triton"]).abs().max().item()
res["cuda_math1_vs_triton_equal_fraction"] = (out["cuda/math1"] == out["triton"]).float().mean().item()
res["cuda_math0_vs_math1_max_abs"] = (out["cuda/math0"] - out["cuda/math1"]).abs().max().item()
os.environ.pop("APM_FAST_ADAM_MATH", None)
for k, v in res.items():
    print(k, v)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "adam_math.json"), "w"), indent=1)
