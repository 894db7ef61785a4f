"""``torchrun --nproc-per-node N -m apm_fast.distributed <command>``

check  both modes against one process on random data (exit status 1 on a mismatch)
ttt    mode 1 on a tensor file: {"names": [str], "images": N x C x S x S, "targets": N x D}
       (targets precomputed by the teacher), one JSON line per image in --out
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..config import APMConfig, preset
from .env import init_distributed

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _config(args) -> APMConfig:
    over = {k: v for k, v in (("grid", args.grid), ("patch", args.patch), ("dim", args.dim),
                              ("heads", args.heads), ("hidden", args.hidden)) if v is not None}
    return preset(args.preset, **over)


def _add_model_args(p, *, preset_default, **defaults):
    # the command line's own argument types: a bad value is refused by name before anything starts
    from ..commands.common import hidden_widths, learning_rate, positive_int, preset_name

    p.add_argument("--preset", type=preset_name, default=preset_default, help="named config (default %(default)s)")
    for name in ("grid", "patch", "dim", "heads"):
        p.add_argument(f"--{name}", type=positive_int, default=defaults.get(name))
    p.add_argument("--hidden", type=hidden_widths, default=defaults.get("hidden"), metavar="W1,W2,...",
                   help="MLP widths, e.g. 4096,2048,1024")
    p.add_argument("--steps", type=positive_int, default=defaults.get("steps", 20))
    p.add_argument("--lr", type=learning_rate, default=defaults.get("lr", 1e-4))
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=defaults.get("dtype", "float32"))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when there is a GPU, else cpu")


def main(argv=None) -> int:
    from ..commands.common import positive_int

    ap = argparse.ArgumentParser(prog="python -m apm_fast.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="both modes against one process, random data")
    _add_model_args(c, preset_default="ttt-l14", grid=5, patch=2, dim=8, heads=2, hidden="24,16",
                    steps=3, lr=1e-3, dtype="float64")
    c.add_argument("--images", type=positive_int, default=5)
    t = sub.add_parser("ttt", help="mode 1: images spread over ranks, into one results file")
    _add_model_args(t, preset_default="ttt-l14")
    t.add_argument("--data", required=True, help="torch.save'd dict with names, images, targets")
    t.add_argument("--out", required=True, help="results file (JSON Lines)")
    t.add_argument("--model", default=None, help="APM .safetensors written by APM.save (else --seed)")
    t.add_argument("--seed", type=int, default=0, help="init seed when --model is not given")
    t.add_argument("--backend", default=None, help="backend of the single-device engine")
    t.add_argument("--no-resume", action="store_true", help="discard earlier results in --out")
    args = ap.parse_args(argv)

    # mode 1 exchanges nothing but barriers and a status word: gloo, even when computing on GPUs
    info = init_distributed(backend="gloo" if args.command == "ttt" else None, device=args.device)
    dtype = _DTYPES[args.dtype]
    try:
        if args.command == "check":
            from .selfcheck import check_modes
            verdict = check_modes(_config(args), steps=args.steps, lr=args.lr, n_images=args.images,
                                  dtype=dtype, device=info.device)
            if info.rank == 0:
                print(json.dumps(verdict, indent=1))
            return 0 if verdict["ok"] else 1
        return _ttt(args, info, dtype)
    finally:
        if info.created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _ttt(args, info, dtype) -> int:
    from ..model import APM
    from ..ttt import TestTimeTrainer
    from .ranks import run_sharded_ttt

    try:
        data = torch.load(args.data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"--data: no such file: {args.data}") from None
    for k in ("names", "images", "targets"):
        if k not in data:
            raise SystemExit(f"--data: expected keys names, images, targets; {k!r} is missing")
    names, images, targets = list(data["names"]), data["images"], data["targets"]
    if not (len(names) == images.shape[0] == targets.shape[0]):
        raise SystemExit(f"--data: names ({len(names)}), images ({images.shape[0]}) and targets "
                         f"({targets.shape[0]}) must have one entry per image")
    if args.model is not None:
        model = APM.load(args.model).to(device=info.device, dtype=dtype)
    else:
        torch.manual_seed(args.seed)        # the same init on every rank: seeded CPU init
        model = APM(_config(args), dtype=torch.float64).to(device=info.device, dtype=dtype)
    trainer = TestTimeTrainer(model, steps=args.steps, lr=args.lr, backend=args.backend)
    index = {n: i for i, n in enumerate(names)}
    run = run_sharded_ttt(names, args.out, trainer=trainer, resume=not args.no_resume,
                          load=lambda n: (images[index[n]], targets[index[n]]))
    print(json.dumps({"rank": run.rank, "world_size": run.world_size, "assigned": run.assigned,
                      "skipped": run.skipped, "computed": run.computed}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
