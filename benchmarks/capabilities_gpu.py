"""GPU check of the paper's other capabilities (distill, islands), beside the benchmark suite.

    python benchmarks/capabilities_gpu.py [--device cuda] [--quick] [--out DIR]

1. the islands' trajectory on the engine: graph mode, the same cls and losses as ``fit`` (the
   captured step unchanged), graph against eager grids, the time of 250 steps with and without
   the grid kept every 50;
2. distillation on the device: full ``ssl-l14`` against a random ViT-L/14 DINOv2 at 448 px, 64
   generated photos, batches of 16, two epochs, teacher on the fly then cached;
3. the ``capabilities`` benchmark section (distillation images/s against the authors' loop,
   islands in ms).
Writes ``capabilities_gpu.json`` into ``--out`` (default ``$OUT`` or the current folder).
``--quick`` runs tiny sizes (a CPU smoke test of this script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(fn, device, n=10):
    fn()
    ts = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from apm_fast import APM, TestTimeTrainer, available_backends, preset
    from apm_fast.backends import default_backend
    from apm_fast.capabilities.distillation import DistillSettings, distill
    from apm_fast.capabilities.agreement import islands
    from apm_fast.teachers.dinov2 import DINOv2Teacher

    dev = torch.device(a.device)
    backend = default_backend(dev)
    res = {"device": str(dev), "backend": backend, "backends": available_backends(), "quick": a.quick}
    small = dict(grid=8, patch=4, hidden=(64, 32, 16), dim=32, heads=4) if a.quick else {}
    steps = 20 if a.quick else 250
    at = list(range(steps // 5, steps + 1, steps // 5))

    # 1. the trajectory
    torch.manual_seed(0)
    cfg = preset("ttt-l14", **small)
    tr = TestTimeTrainer(APM(cfg, device=dev), steps=steps, lr=1e-4, backend=backend)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=dev)
    y = torch.randn(1, cfg.dim, device=dev)
    fit = tr.fit(x, y)
    traj = tr.trajectory(x, y, [0] + at, weights=True)
    res["mode"] = tr.engine.mode
    res["cls_equal_to_fit"] = bool(torch.equal(traj.cls, fit.cls))
    res["losses_equal_to_fit"] = bool(torch.equal(traj.losses, fit.losses))
    torch.manual_seed(0)                              # the same init, run eagerly
    eager = TestTimeTrainer(APM(cfg, device=dev), steps=steps, lr=1e-4, backend=backend)
    eager.engine.graphs = False
    et = eager.trajectory(x, y, at)
    k = at[0]
    rel = lambda u, v: float((u.float() - v.float()).abs().max() / v.float().abs().max())   # noqa: E731
    res["graph_vs_eager_rel"] = {"grid_first": rel(traj.grids[k], et.grids[k]), "cls": rel(traj.cls, et.cls)}
    res["ttt_ms"] = _median_ms(lambda: tr.fit(x, y), dev)
    res["trajectory_ms"] = _median_ms(lambda: tr.trajectory(x, y, at), dev)
    t0 = time.perf_counter()
    islands(tr, x[0], y[0], at)
    res["islands_with_pca_ms"] = 1e3 * (time.perf_counter() - t0)
    print(json.dumps(res, indent=1), flush=True)

    # 2. distillation on the device
    from PIL import Image
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        n = 8 if a.quick else 64
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
        torch.manual_seed(0)
        kw = {"depth": 1, "embed_dim": 32, "num_heads": 2} if a.quick else {}
        teacher = DINOv2Teacher("vit_large_patch14_dinov2", None, grid=8 if a.quick else 32, device=dev,
                                model_kwargs=kw)
        scfg = preset("ssl-l14", dim=teacher.dim, **({"grid": 8, "patch": 4, "hidden": (64, 64, 32)} if a.quick else {}))
        for cache in (False, True):
            run = Path(tmp) / f"run{cache}"
            t0 = time.perf_counter()
            r = distill(folder, teacher, run, config=scfg, settings=DistillSettings(
                epochs=2, batch=4 if a.quick else 16, save_every=1000, cache_features=cache), progress=False)
            res[f"distill_cache_{cache}"] = {"seconds": time.perf_counter() - t0, "history": r.history}
    print(json.dumps({k: v for k, v in res.items() if k.startswith("distill")}, indent=1), flush=True)

    # 3. the benchmark section
    from apm_fast.bench.context import Context
    from apm_fast.bench.options import BenchOptions
    from apm_fast.bench.sections import capabilities

    opts = BenchOptions.quick_defaults(device=str(dev), out=None) if a.quick else BenchOptions(device=str(dev), out=None)
    sec = capabilities.run(Context(opts))
    res["bench"] = [{k: v for k, v in row.items() if k != "timing"} for row in sec["rows"]]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "capabilities_gpu.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["bench"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
