"""The triton table's captured step at 1 and 64 students with the activation kernel's rows of one
grid row a program (ONE_ROW) on and off (APM_FAST_ACT_ONE_ROW, a switch of this experiment only),
in turns on, off, on, off: python3 act_ab.py OUT.jsonl"""
import json, os, sys
import torch
from apm_fast import APM
from apm_fast.config import preset
from apm_fast.ttt.trainer import TestTimeTrainer
dev = torch.device("cuda")
cfg = preset("ttt-l14")
torch.manual_seed(0)
model = APM(cfg).to(dev)
out = open(sys.argv[1], "a")
for turn, on in enumerate(["1", "0", "1", "0"]):
    os.environ["APM_FAST_ACT_ONE_ROW"] = on
    for S in (1, 64):
        g = torch.Generator(device=dev).manual_seed(S)
        x = torch.randn(S, 3, cfg.image_size, cfg.image_size, device=dev, generator=g)
        y = torch.randn(S, cfg.dim, device=dev, generator=g)
        tr = TestTimeTrainer(model, steps=20, backend="triton", students=S, precision=torch.bfloat16)
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
        row = dict(turn=turn, one_row=on == "1", S=S, ms_per_step=ms, steps_img_s=S / (20 * ms * 1e-3),
                   cls_norm=float(res.cls.float().norm()), loss_last=float(res.losses[:, -1].float().mean()))
        out.write(json.dumps(row) + "\n"); out.flush(); print(json.dumps(row), flush=True)
        del tr, prog, res
        torch.cuda.empty_cache()
