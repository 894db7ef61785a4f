"""Two trees of the package side by side on one machine: the Triton table (``ttt-l14``, 20 steps),
64 students side by side, fp32 and bf16 moments, images/s over the median of 6 fits of 64 images.

Run once per tree, each with that tree's ``apm_fast`` first on PYTHONPATH (the Triton kernels
copied in as ``apm_fast/kernels``), from a folder outside the repository:

    PYTHONPATH=<tree> OUT=<folder> python3 ab64.py <label>

writes ``<folder>/ab-<label>.json`` (``ab-1d73e3a.json``, ``ab-02d9635.json`` here: the tree at the
start of this change and 02d9635, in that order on one machine). ``OUTER_CFG=BR,BC,BK,WARPS`` sets
the tiles of the Triton Adam from factors (not used for these files)."""
import os, sys, json, statistics, torch
from apm_fast import APM, TestTimeTrainer, preset
label = sys.argv[1]
if os.environ.get("OUTER_CFG"):
    from apm_fast.kernels import adam as _A
    _A.OUTER_BR, _A.OUTER_BC, _A.OUTER_BK, _A.OUTER_WARPS = (int(v) for v in os.environ["OUTER_CFG"].split(","))
    label += "-" + os.environ["OUTER_CFG"]
torch.manual_seed(0)
model = APM(preset("ttt-l14"), device="cuda")
px = model.config.image_size
res = {"label": label}
def dump():
    with open(os.path.join(os.environ["OUT"], f"ab-{label}.json"), "w") as fh:
        fh.write(json.dumps(res) + "\n")
def ev():
    return torch.cuda.Event(enable_timing=True)
for S, moments in [(64, None), (64, "bf16")]:
    x = torch.randn(S, 3, px, px, device="cuda"); y = torch.randn(S, model.config.dim, device="cuda")
    t = TestTimeTrainer(model, steps=20, lr=1e-3, backend="triton", students=S, precision="bf16", moments=moments)
    r0 = t.fit(x, y); t.fit(x, y)
    ms = []
    for _ in range(6):
        a, b = ev(), ev(); a.record(); t.fit(x, y); b.record(); b.synchronize(); ms.append(a.elapsed_time(b))
    res[f"S64_{moments or 'fp32'}_img_s"] = S * 1e3 / statistics.median(ms)
    res[f"S64_{moments or 'fp32'}_ms"] = sorted(ms)
    res[f"S64_{moments or 'fp32'}_cls_norm"] = float(r0.cls.norm())
    res[f"S64_{moments or 'fp32'}_loss_last"] = float(r0.losses[:, -1].mean())
    del t; torch.cuda.empty_cache()
    dump()
print(json.dumps(res), flush=True)
