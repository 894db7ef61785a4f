"""``torchrun --nproc-per-node N -m apm_fast.distributed <command>``

check  both modes against one process on random data (exit status 1 on a mismatch)
ttt    mode 1 on a tensor file: {"names": [str], "images": N x C x S x S, "targets": N x D}
       (targets precomputed by the teacher), one JSON line per image in --out, with the run's
       settings under "run"; a rerun goes on where the last one stopped, and is refused when
       its settings differ (--no-resume starts afresh); a --model file is stated by its path
       and the sha256 of its bytes, so a file changed since is other settings

Errors in the options or the files are one line on every rank, exit status 2 (as apm-fast's);
APM_FAST_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import pickle
import sys

import torch

from ..cli import CLIError, run_command
from ..config import APMConfig, preset
from .env import init_distributed

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
KEY_FIELD = "input"          # each ttt record's key: the image's name in --data
TTT_PRESET, TTT_SEED = "ttt-l14", 0
# ttt's options that build the student, which --model's file fixes instead: their argparse
# default is None, so that one given with --model is refused rather than ignored
_MODEL_OPTIONS = ("preset", "grid", "patch", "hidden", "dim", "heads", "seed")


def _config(args) -> APMConfig:
    over = {k: v for k, v in (("grid", args.grid), ("patch", args.patch), ("dim", args.dim),
                              ("heads", args.heads), ("hidden", args.hidden)) if v is not None}
    return preset(args.preset, **over)


def _add_model_args(p, *, preset_default, **defaults):
    # the command line's own argument types: a bad value is refused by name before anything starts
    from ..commands.common import hidden_widths, learning_rate, positive_int, preset_name

    shown = preset_default or TTT_PRESET
    p.add_argument("--preset", type=preset_name, default=preset_default, help=f"named config (default {shown})")
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
    from ..commands.common import positive_int, seed

    ap = argparse.ArgumentParser(prog="python -m apm_fast.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="both modes against one process, random data")
    _add_model_args(c, preset_default="ttt-l14", grid=5, patch=2, dim=8, heads=2, hidden="24,16",
                    steps=3, lr=1e-3, dtype="float64")
    c.add_argument("--images", type=positive_int, default=5)
    t = sub.add_parser("ttt", help="mode 1: images spread over ranks, into one results file")
    _add_model_args(t, preset_default=None)
    t.add_argument("--data", required=True, help="torch.save'd dict with names, images, targets")
    t.add_argument("--out", required=True, help="results file (JSON Lines)")
    t.add_argument("--model", default=None,
                   help="APM file written by APM.save (its config and weights; else --preset ... --seed)")
    t.add_argument("--seed", type=seed, default=None,
                   help=f"init seed when --model is not given, in [0, 2**63 - 1] (default {TTT_SEED})")
    t.add_argument("--backend", default=None, help="backend of the single-device engine")
    t.add_argument("--no-resume", action="store_true", help="discard earlier results in --out")
    args = ap.parse_args(argv)
    # the main command line's handling: a user's mistake is one line and exit status 2 on every rank
    return run_command(f"{ap.prog} {args.command}", lambda: _run(args))


@contextlib.contextmanager
def _from_option(option):
    """``setup_errors``, its one line naming the option the input came from."""
    from ..commands.common import setup_errors

    try:
        with setup_errors():
            yield
    except CLIError as exc:
        raise CLIError(f"{option}: {exc}") from exc.__cause__


def _run(args) -> int:
    from ..commands.common import pick_device, setup_errors

    pick_device(args.device)                  # --device cuda without a GPU: refused by name
    if args.command == "ttt":
        given = [f"--{n}" for n in _MODEL_OPTIONS if getattr(args, n) is not None]
        if args.model is not None and given:
            raise CLIError(f"{', '.join(given)}: not used with --model, whose file fixes the model's config "
                           f"and weights; expected {'it' if len(given) == 1 else 'them'} left out")
        if args.model is None:
            args.preset = args.preset or TTT_PRESET
            args.seed = TTT_SEED if args.seed is None else args.seed
    config = None
    if args.command == "check" or args.model is None:
        with setup_errors():                  # e.g. --heads that does not divide --dim
            config = _config(args)
    if args.command == "ttt":
        from ..commands.sharded import check_out

        # before anything starts: --out can be written, holds results only and is not --data
        check_out(args.out, [args.data], args.model, key_field=KEY_FIELD)
    try:
        # mode 1 exchanges nothing but barriers and a status word: gloo, even when computing on GPUs
        info = init_distributed(backend="gloo" if args.command == "ttt" else None, device=args.device)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"torch.distributed: {exc}") from exc
    dtype = _DTYPES[args.dtype]
    try:
        if args.command == "check":
            from .selfcheck import check_modes
            with setup_errors():
                verdict = check_modes(config, steps=args.steps, lr=args.lr, n_images=args.images,
                                      dtype=dtype, device=info.device)
            if info.rank == 0:
                print(json.dumps(verdict, indent=1))
            return 0 if verdict["ok"] else 1
        return _ttt(args, config, info, dtype)
    finally:
        if info.created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _load_data(path):
    """names, images, targets of the --data file, refused by name when it is not one."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"--data: no such file: {path!r}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as exc:
        raise CLIError(f"--data: {path!r} is not a file written by torch.save ({type(exc).__name__}); "
                       f"expected a dict with names, images, targets") from exc
    if not isinstance(data, dict):
        raise CLIError(f"--data: expected a dict with names, images, targets, got {type(data).__name__}")
    for k in ("names", "images", "targets"):
        if k not in data:
            raise CLIError(f"--data: expected keys names, images, targets; {k!r} is missing")
    return list(data["names"]), data["images"], data["targets"]


def _file_sha256(path) -> str:
    """The sha256 of a file's bytes (hex): what a run's file held, whatever its path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ttt(args, config, info, dtype) -> int:
    from ..commands.common import code_version, setup_errors, student_memory
    from ..commands.sharded import check_settings
    from ..model import APM
    from ..ttt import TestTimeTrainer
    from ..validation import check_images, check_targets
    from .ranks import input_keys, run_sharded_ttt, ttt_record

    names, images, targets = _load_data(args.data)
    with _from_option("--data"):
        input_keys(names)                     # one string per image, none twice
    model_sha256 = None
    if args.model is not None:
        with _from_option("--model"):
            model = APM.load(args.model).to(device=info.device, dtype=dtype)
            model_sha256 = _file_sha256(args.model)
    else:
        with setup_errors(), student_memory(config, info.device):
            torch.manual_seed(args.seed)    # the same init on every rank: seeded CPU init
            model = APM(config, dtype=torch.float64).to(device=info.device, dtype=dtype)
    config = model.config
    with _from_option("--data"):
        images = check_images(images, config, values=False)
        targets = check_targets(targets, images.shape[0], config.dim, values=False)
    if len(names) != images.shape[0]:
        raise CLIError(f"--data: names ({len(names)}), images ({images.shape[0]}) and targets "
                       f"({targets.shape[0]}) must have one entry per image")
    with setup_errors(), student_memory(config, info.device):    # e.g. --backend bogus
        trainer = TestTimeTrainer(model, steps=args.steps, lr=args.lr, backend=args.backend)
    # what the results depend on, in every record (as apm-fast ttt's "run"); a rerun into the same
    # --out must have the same (device, backend, world size and code version may differ)
    run_info = {
        "model": args.model, "model_sha256": model_sha256,   # the path, and what the file held
        "preset": None if args.model is not None else args.preset,
        "grid": config.grid, "patch": config.patch, "hidden": list(config.hidden), "heads": config.heads,
        "dim": config.dim, "steps": args.steps, "lr": args.lr, "dtype": args.dtype,
        "backend": trainer.backend, "precision": trainer.precision, "moments": trainer.moments,
        "device": str(info.device), "seed": None if args.model is not None else args.seed,
        **code_version(),
    }
    if not args.no_resume:                    # --no-resume discards the earlier results instead
        check_settings(args.out, run_info, key_field=KEY_FIELD)
    index = {n: i for i, n in enumerate(names)}
    with setup_errors():
        run = run_sharded_ttt(names, args.out, trainer=trainer, resume=not args.no_resume,
                              key_field=KEY_FIELD, load=lambda n: (images[index[n]], targets[index[n]]),
                              record=lambda n, result: dict(ttt_record(result), run=run_info))
    print(json.dumps({"rank": run.rank, "world_size": run.world_size, "assigned": run.assigned,
                      "skipped": run.skipped, "computed": run.computed}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
