"""The engine's captured step with the pool's weights updated from their gradients' factors (on)
and written out (off), on the triton and cuda tables at 1 and 64 students, in turns on, off, on,
off: python3 pool_ab.py OUT.jsonl"""
import json, sys
import torch
from apm_fast import APM
from apm_fast.config import preset
from apm_fast.ttt.trainer import TestTimeTrainer
dev = torch.device("cuda")
cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
out = open(sys.argv[1], "a")
for turn, on in enumerate([True, False, True, False]):
    for table in ("triton", "cuda"):
        for S in (1, 64):
            g = torch.Generator(device=dev).manual_seed(S)
            x = torch.randn(S, 3, cfg.image_size, cfg.image_size, device=dev, generator=g)
            y = torch.randn(S, cfg.dim, device=dev, generator=g)
            tr = TestTimeTrainer(model, steps=20, backend=table, students=S, precision=torch.bfloat16)
            tr.engine.pool_factors = on
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
            row = dict(turn=turn, table=table, pool_factors=on, S=S, ms_per_step=ms,
                       steps_img_s=S / (20 * ms * 1e-3), factored=prog.factored,
                       cls_norm=float(res.cls.float().norm()), loss_last=float(res.losses[:, -1].float().mean()))
            out.write(json.dumps(row) + "\n"); out.flush(); print(json.dumps(row), flush=True)
            del tr, prog, res
            torch.cuda.empty_cache()
