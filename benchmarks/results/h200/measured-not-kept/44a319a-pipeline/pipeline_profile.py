"""The pipelined step at 64 students against the plain one, timed and profiled (H200, triton).

Run at commit 44a319a (the pipelined step; reverted after it) with one line changed in
``StudentProgram._groups``: ``lane = Beside(self.device, True, role=os.environ.get("APM_PIPE_ROLE",
"adam"))``, so that the groups' updates run on the default-priority "adam" stream (as committed)
or, with ``APM_PIPE_ROLE=pipehigh``, on a stream of the highest priority, like the step's own.

    python3 pipeline_profile.py VARIANT {off,on,4} [bf16]

VARIANT only labels the output line. Prints one JSON line: images/s over whole fits of 128 images
(20 steps each; median of 6), and from one profile of 3 replayed steps the step's span and the
time covered by Adam's kernels, by every other kernel, and by both (unions of their intervals),
per step. ``pipeline_profile.jsonl`` holds the five lines of the run reported in the results
README ("Measured and not kept").
"""
import os, sys, time, json
import torch
from apm_fast import APM, TestTimeTrainer, preset
from apm_fast.bench.timing import measure
torch.manual_seed(0)
S = 64
model = APM(preset("ttt-l14"), device="cuda")
px = model.config.image_size
x = torch.randn(2 * S, 3, px, px, device="cuda")
y = torch.randn(2 * S, model.config.dim, device="cuda")
variant = sys.argv[1]
pipe = {"off": False, "on": True, "4": 4}[sys.argv[2]]
moments = sys.argv[3] if len(sys.argv) > 3 else None
t = TestTimeTrainer(model, steps=20, lr=1e-3, backend="triton", students=S, precision="bf16", moments=moments)
t.engine.pipeline = pipe
t.fit(x[:S], y[:S])
import statistics
t.fit(x, y)
ms = []
for _ in range(6):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); t.fit(x, y); b.record(); b.synchronize(); ms.append(a.elapsed_time(b))
class tm: median_ms = statistics.median(ms)
prog = t.engine._program
res = {"variant": variant, "pipeline": sys.argv[2], "moments": moments, "img_s": 2 * S * 1e3 / tm.median_ms,
       "median_ms": tm.median_ms, "min_ms": min(ms), "max_ms": max(ms), "overlap": prog.overlap, "groups": len(prog.groups)}
# one step's kernels under the profiler: Adam time, GEMM time, span
from torch.profiler import profile, ProfilerActivity
prog.load(x[:S], y[:S])
for _ in range(3):
    prog.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        prog.step()
    torch.cuda.synchronize()
ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
adam = [(e.time_range.start, e.time_range.end) for e in ev if "adam" in e.name]
other = [(e.time_range.start, e.time_range.end) for e in ev if "adam" not in e.name]
def union(iv):
    iv = sorted(iv); tot = 0; cur = None
    for a, b in iv:
        if cur is None or a > cur[1]:
            if cur: tot += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur: tot += cur[1] - cur[0]
    return tot
span = max(e.time_range.end for e in ev) - min(e.time_range.start for e in ev)
res.update(span_us=span / 3, adam_us=union(adam) / 3, other_us=union(other) / 3, all_us=union(adam + other) / 3)
print(json.dumps(res))
