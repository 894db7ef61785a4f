"""Worker processes for tests/test_distributed.py (spawned, so they live in an importable module).

Each worker joins a gloo group through a file store in the test's temporary folder (no
rendezvous port), with gloo's own connections kept on the loopback interface.
"""
import json
import os

import torch
import torch.distributed as dist

from apm_fast import APM, APMConfig, TestTimeTrainer

CONFIG = APMConfig(grid=5, patch=2, hidden=(24, 16), dim=8, heads=2, rgb_head=True)
SEED = 0


def make_model(config=CONFIG):
    torch.manual_seed(SEED)
    return APM(config, dtype=torch.float64)


def loopback_env():
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _join(rank, world, tmp):
    loopback_env()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                            rank=rank, world_size=world)


def mode2_worker(rank, world, tmp, steps, lr):
    from apm_fast.distributed import ShardedQueryTrainer, sharded_forward

    _join(rank, world, tmp)
    data = torch.load(os.path.join(tmp, "data.pt"))
    images, targets = data["images"], data["targets"]
    model = make_model()
    out = sharded_forward(model, images)
    trainer = ShardedQueryTrainer(model, steps=steps, lr=lr)
    prog = trainer.trainer.program(1)          # one step by hand: the gradients it leaves
    prog.load(images[:1], targets[:1])
    prog.step()
    grads = {n: v[0].clone() for n, v in prog.store.grad_views.items()}
    loss = prog.losses[0, 0].clone()
    res = trainer.fit(images, targets)
    torch.save({"cls": out.cls, "grid": out.grid, "rgb": out.rgb, "start": out.start, "stop": out.stop,
                "loss": loss, "grads": grads, "ttt_cls": res.cls, "ttt_losses": res.losses,
                "rows": prog.pos_in.shape[0], "slices": trainer.shards.slices},
               os.path.join(tmp, f"mode2-rank{rank}.pt"))
    dist.destroy_process_group()


def mode1_worker(rank, world, tmp, tag, steps, lr, fail_rank, fail_after):
    """Mode 1 over the inputs listed in data.pt. The rank ``fail_rank`` dies while writing its
    record number ``fail_after + 1`` (a torn line, then exit), as if killed mid-write."""
    from apm_fast.distributed import run_sharded_ttt
    from apm_fast.distributed.results import part_path

    _join(rank, world, tmp)
    data = torch.load(os.path.join(tmp, "data.pt"))
    names, images, targets = data["names"], data["images"], data["targets"]
    index = {n: i for i, n in enumerate(names)}
    out_path = os.path.join(tmp, "results.jsonl")
    trainer = TestTimeTrainer(make_model(), steps=steps, lr=lr)
    started = []
    log = open(os.path.join(tmp, f"started-{tag}-rank{rank}.txt"), "a")

    def load(name):
        if rank == fail_rank and len(started) == fail_after:
            res = trainer.fit(images[index[name]], targets[index[name]])
            line = json.dumps({"input": name, "cls": res.cls[0].tolist()})
            with open(part_path(out_path, rank), "a") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            os._exit(3)
        started.append(name)
        log.write(name + "\n")
        log.flush()
        return images[index[name]], targets[index[name]]

    run = run_sharded_ttt(names, out_path, trainer=trainer, load=load)
    with open(os.path.join(tmp, f"run-{tag}-rank{rank}.json"), "w") as f:
        json.dump({"assigned": run.assigned, "skipped": run.skipped, "computed": run.computed}, f)
    dist.destroy_process_group()


def mode2_edge_worker(rank, world, tmp, case):
    """Mode 2 at its edges: ``empty`` (one query, so every rank but the first holds none),
    ``settings`` (each rank another number of steps), ``nan`` (the same images with a NaN)."""
    from apm_fast.distributed import ShardedQueryTrainer

    _join(rank, world, tmp)
    out = {}
    try:
        if case == "empty":
            model = make_model(APMConfig(grid=1, patch=2, hidden=(24, 16), dim=8, heads=2))
            g = torch.Generator().manual_seed(3)
            x, y = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
            out["cls"] = ShardedQueryTrainer(model, steps=2, lr=1e-2).fit(x, y).cls
        elif case == "settings":
            ShardedQueryTrainer(make_model(), steps=2 + rank, lr=1e-2)
        else:
            g = torch.Generator().manual_seed(3)
            x, y = torch.randn(1, 3, 10, 10, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
            x[0, 0, 0, 0] = float("nan")
            ShardedQueryTrainer(make_model(), steps=2, lr=1e-2).fit(x, y)
    except ValueError as exc:
        out["error"] = str(exc)
    torch.save(out, os.path.join(tmp, f"edge-{case}-rank{rank}.pt"))
    dist.destroy_process_group()
