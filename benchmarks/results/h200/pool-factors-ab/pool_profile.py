"""One captured step at one image under torch.profiler (the bench's step timeline), with the pool's
weights from their factors (on) and written (off), cuda and triton tables:
python3 pool_profile.py OUT.jsonl"""
import json, sys
from types import SimpleNamespace
import torch
from torch.profiler import ProfilerActivity
from apm_fast import APM
from apm_fast.bench.sections.engine import _step_timeline
from apm_fast.config import preset
from apm_fast.ttt.trainer import TestTimeTrainer
dev = torch.device("cuda")
cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
out = open(sys.argv[1], "a")
g = torch.Generator(device=dev).manual_seed(1)
x = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=dev, generator=g)
y = torch.randn(1, cfg.dim, device=dev, generator=g)
for table in ("cuda", "triton"):
    for on in (True, False):
        tr = TestTimeTrainer(model, steps=20, backend=table, students=1, precision=torch.bfloat16)
        tr.engine.pool_factors = on
        tr.fit(x, y)
        tl = _step_timeline(SimpleNamespace(device=dev), tr.program(1), [ProfilerActivity.CUDA])
        row = dict(table=table, pool_factors=on, sum_us=tl["sum_us"], span_us=tl["span_us"],
                   timeline=[(t["stream"], round(t["start_us"], 1), round(t["us"], 1), t["kernel"][:70])
                             for t in tl["timeline"]])
        out.write(json.dumps(row) + "\n"); out.flush()
        print(table, on, round(tl["span_us"], 1), flush=True)
        del tr
