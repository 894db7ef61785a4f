"""The engine's captured step on the triton table (and the cuda table where asked) at 1 and 64
students, in whatever tree `apm_fast` is imported from: python3 engine_ab.py LABEL OUT.jsonl [cuda]."""
import json
import sys

import torch

from apm_fast import APM
from apm_fast.config import preset
from apm_fast.ttt.trainer import TestTimeTrainer

label, path = sys.argv[1], sys.argv[2]
tables = ["triton"] + (["cuda"] if sys.argv[3:] == ["cuda"] else [])
dev = torch.device("cuda")
cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
with open(path, "a") as out:
    for table in tables:
        for S in (1, 64):
            g = torch.Generator(device=dev).manual_seed(S)
            x = torch.randn(S, 3, cfg.image_size, cfg.image_size, device=dev, generator=g)
            y = torch.randn(S, cfg.dim, device=dev, generator=g)
            tr = TestTimeTrainer(model, steps=20, backend=table, students=S, precision=torch.bfloat16)
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
            row = dict(label=label, table=table, S=S, ms_per_step=ms, steps_img_s=S / (20 * ms * 1e-3),
                       peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                       cls_norm=float(res.cls.float().norm()), loss_last=float(res.losses[:, -1].float().mean()))
            out.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            del tr, prog, res
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
