"""Scaling of both distributed modes with the number of GPUs, in one torchrun launch.

    PYTHONPATH=. torchrun --standalone --nproc-per-node 8 benchmarks/dist_scaling.py \
        --out results/dist_scaling.json

The launch uses all N GPUs; the script measures every group size n in 1, 2, 4, ... N on the
first n ranks (the others wait) so that one JSON holds the whole curve:

* mode 1 (images across GPUs): ``--images`` test images trained with the single-GPU engine,
  spread over n ranks through the restart-safe results file: images/s vs n (strong scaling);
* mode 2 (one image's queries across GPUs): the latency of one TTT step (forward, backward,
  gradient all-reduce, Adam) of one image whose L queries are spread over n ranks.

A correctness gate (both modes against one GPU, ``apm_fast.distributed.selfcheck``) runs first on
all N ranks; no timing is reported if it fails. NVLink multicast must stay off on the lent
machines: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are
set below before torch starts NCCL (an explicit value in the environment wins).
``--device cpu`` runs the same thing on gloo with CPU processes (a smoke test of the script).
"""
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from apm_fast import APM, TestTimeTrainer, preset  # noqa: E402
from apm_fast.distributed import ShardedQueryTrainer, init_distributed, run_sharded_ttt  # noqa: E402
from apm_fast.distributed.queries import _loss_and_grads  # noqa: E402
from apm_fast.distributed.selfcheck import check_modes  # noqa: E402

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file written by rank 0")
    ap.add_argument("--preset", default="ttt-l14")
    ap.add_argument("--grid", type=int, default=None)
    ap.add_argument("--patch", type=int, default=None)
    ap.add_argument("--hidden", default=None, help="MLP widths, e.g. 4096,2048,1024")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ap.add_argument("--steps", type=int, default=20, help="TTT steps per image (mode 1)")
    ap.add_argument("--images", type=int, default=64, help="test images of mode 1, for every n")
    ap.add_argument("--step-iters", type=int, default=20, help="timed steps per repeat (mode 2)")
    ap.add_argument("--repeats", type=int, default=7, help="repeats of each timing (median kept)")
    ap.add_argument("--sizes", default=None, help="group sizes, e.g. 1,2,4,8 (default powers of 2 and N)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    return ap.parse_args()


def config_of(args):
    over = {k: getattr(args, k) for k in ("grid", "patch", "dim", "heads") if getattr(args, k) is not None}
    if args.hidden:
        over["hidden"] = tuple(int(h) for h in args.hidden.split(","))
    return preset(args.preset, **over)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(info):
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            return None
    m = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
         "world_size": info.world_size, "device": str(info.device), "commit": git("rev-parse", "HEAD"),
         "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
         "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                "NVSHMEM_DISABLE_NVLS", "NCCL_ALGO", "NCCL_PROTO")}}
    if info.device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(info.device)
        m["gpus_on_node"] = torch.cuda.device_count()
        m["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    return m


def make_model(config, dtype, device):
    torch.manual_seed(0)          # the same init on every rank: seeded CPU init, then moved
    return APM(config).to(device=device, dtype=dtype)


def problem(config, n, dtype, device):
    g = torch.Generator().manual_seed(1)
    s = config.image_size
    images = torch.randn(n, config.in_chans, s, s, generator=g).to(device, dtype)
    targets = torch.randn(n, config.dim, generator=g).to(device, dtype)
    return images, targets


def bench_mode1(config, args, n, groups, info, workdir):
    """Seconds for args.images images over the first n ranks (None on the others)."""
    dtype = _DTYPES[args.dtype]
    images, targets = problem(config, args.images, dtype, info.device)
    names = [f"img-{i:05d}" for i in range(args.images)]
    index = {k: i for i, k in enumerate(names)}
    times = None
    if info.rank < n:
        trainer = TestTimeTrainer(make_model(config, dtype, info.device), steps=args.steps)
        trainer.fit(images[:1], targets[:1])                       # warm-up (handles, autotuning)
        times = []
        for r in range(max(1, args.repeats // 3)):                 # each repeat is a whole run
            out = os.path.join(workdir, f"mode1-n{n}-r{r}.jsonl")
            dist.barrier(group=groups["gloo"])
            t0 = time.perf_counter()
            run = run_sharded_ttt(names, out, trainer=trainer, group=groups["gloo"], resume=False,
                                  load=lambda k: (images[index[k]], targets[index[k]]))
            sync(info.device)
            times.append(time.perf_counter() - t0)
            if info.rank == 0 and len(run.records) != args.images:
                raise RuntimeError(f"mode 1 at n={n}: {len(run.records)} records for {args.images} images")
    dist.barrier()
    return times


def bench_mode2(config, args, n, groups, info):
    """Per-step seconds of one image's TTT step over the first n ranks (None on the others)."""
    dtype = _DTYPES[args.dtype]
    images, targets = problem(config, 1, dtype, info.device)
    times = None
    if info.rank < n:
        model = make_model(config, dtype, info.device)
        trainer = ShardedQueryTrainer(model, steps=args.steps, group=groups["main"])
        trainer.fit(images, targets)                                # warm-up
        opt = trainer._optimizer()
        times = []
        for _ in range(args.repeats):
            dist.barrier(group=groups["gloo"])
            sync(info.device)
            t0 = time.perf_counter()
            for _ in range(args.step_iters):
                _loss_and_grads(model, images, targets, groups["main"])
                opt.step()
            sync(info.device)
            times.append((time.perf_counter() - t0) / args.step_iters)
        trainer.reset()
    dist.barrier()
    return times


def summary(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def main():
    args = parse_args()
    info = init_distributed(device=args.device)
    if info.world_size == 1 and not dist.is_initialized():
        sys.exit("launch with torchrun, e.g. torchrun --standalone --nproc-per-node 8 "
                 "benchmarks/dist_scaling.py --out results/dist_scaling.json")
    config = config_of(args)
    world = info.world_size
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else sorted({2 ** k for k in range(world.bit_length()) if 2 ** k <= world} | {world}))
    if any(not 1 <= s <= world for s in sizes):
        sys.exit(f"--sizes: expected group sizes between 1 and {world}, got {sizes}")

    # correctness gate on all ranks: both modes against one device, at a small shape
    gate_cfg = preset("ttt-l14", grid=8, patch=4, hidden=(256, 128), dim=64, heads=8)
    gate = check_modes(gate_cfg, steps=3, lr=1e-3, dtype=torch.float32, device=info.device)
    report = {"machine": machine(info), "config": config.to_dict(), "dtype": args.dtype,
              "steps": args.steps, "images": args.images, "gate": gate, "mode1": [], "mode2": []}
    if gate["ok"]:
        box = [tempfile.mkdtemp(prefix="apm-dist-bench-") if info.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        workdir = box[0]
        for n in sizes:
            ranks = list(range(n))
            groups = {"main": dist.new_group(ranks), "gloo": dist.new_group(ranks, backend="gloo")}
            t1 = bench_mode1(config, args, n, groups, info, workdir)
            t2 = bench_mode2(config, args, n, groups, info)
            if info.rank == 0:
                s1, s2 = summary(t1), summary(t2)
                report["mode1"].append({"gpus": n, "seconds": s1, "images_per_s": args.images / s1["median"]})
                report["mode2"].append({"gpus": n, "step_s": s2})
        if info.rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
            base1 = report["mode1"][0]["images_per_s"] if report["mode1"] else None
            base2 = report["mode2"][0]["step_s"]["median"] if report["mode2"] else None
            for r in report["mode1"]:
                r["speedup_vs_first"] = r["images_per_s"] / base1
            for r in report["mode2"]:
                r["speedup_vs_first"] = base2 / r["step_s"]["median"]
    if info.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report["machine"]))
        print(f"gate: {'ok' if gate['ok'] else 'FAILED'} {json.dumps(gate['errors'])}")
        print(f"{'GPUs':>5} {'mode 1 images/s':>16} {'x':>6} {'mode 2 step ms':>15} {'x':>6}")
        for r1, r2 in zip(report["mode1"], report["mode2"]):
            print(f"{r1['gpus']:>5} {r1['images_per_s']:>16.2f} {r1['speedup_vs_first']:>6.2f} "
                  f"{1e3 * r2['step_s']['median']:>15.3f} {r2['speedup_vs_first']:>6.2f}")
    ok = gate["ok"]
    if info.created:
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
