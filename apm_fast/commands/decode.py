"""``apm-fast decode IMAGE --checkpoint CKPT --out DIR``: the RGB head's reconstruction of an image.

Writes ``DIR/decode.png`` (the input, the cell averages the head is asked for, its reconstruction,
the per-cell error map; the paper's Figure 5 (ii)) and ``DIR/decode.json``, and prints the PSNR.
CKPT: a model saved by apm-fast (``APM.save``, ``apm-fast distill``'s ``model.safetensors``) or the
authors' state dict (their COCO checkpoint: no options needed). ``--ttt``: for a TTT model with an
RGB head (pool and RGB head), test-time train it on the image first (teacher and training
options as ``apm-fast ttt``, refused without ``--ttt``; the trunk is trained, the RGB head is the
checkpoint's).
"""
from __future__ import annotations

import argparse

from . import capability_common as cc
from . import common

HELP = "decode an image's colours through a model's RGB head; PSNR and an error map"

# the options of --ttt and their values with --ttt (None: given without --ttt, they are refused)
TTT_DEFAULTS = {"teacher": "ViT-B-16", "pretrained": "openai", "steps": 20, "lr": 1e-4, "precision": None,
                "normalize_target": False, "seed": 0}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = cc.command_parser(subparsers, "decode", HELP, __doc__,
                          "apm-fast decode photo.jpg --checkpoint apm_coco.pth --out decoded/",
                          {"IMAGE": "one image file"}, "folder for decode.png and decode.json")
    cc.add_checkpoint_args(p)
    cc.add_input_args(p, crop_default="stretch")
    g = p.add_argument_group("test-time training (--ttt; its options are refused without it)")
    g.add_argument("--ttt", action="store_true", help="test-time train the model on the image first (needs a pool)")
    d = TTT_DEFAULTS                     # shown here, applied by _ttt_options
    g.add_argument("--teacher", default=None, help=f"open_clip teacher of --ttt (default: {d['teacher']})")
    g.add_argument("--pretrained", default=None, metavar="TAG|PATH|none",
                   help=f"its weights (default: {d['pretrained']})")
    g.add_argument("--steps", type=common.positive_int, default=None, help=f"Adam steps of --ttt (default: {d['steps']})")
    g.add_argument("--lr", type=common.learning_rate, default=None, help=f"their learning rate (default: {d['lr']})")
    g.add_argument("--precision", default=None, choices=common.PRECISION_CHOICES,
                   help="GEMM dtype of --ttt's training of the model only (default: bf16 on a GPU, fp32 on a "
                        "CPU); its weights and Adam's state are kept in fp32 (fp64 with fp64). The teacher "
                        "computes in bf16 on a GPU, fp32 on a CPU, whatever this is (teacher_precision in "
                        "decode.json)")
    g.add_argument("--normalize-target", action="store_true", default=None,
                   help="regress the unit-norm teacher embedding")
    g.add_argument("--seed", type=common.seed, default=None, help=f"seed of a random teacher (default: {d['seed']})")
    return p


def _ttt_options(args):
    """--ttt's options given without --ttt are refused (nothing would use them); with it, those
    not given take their defaults."""
    for name, default in TTT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif not args.ttt:
            flag = "--" + name.replace("_", "-")
            raise common.CLIError(f"{flag}: expected with --ttt (an option of the test-time training), "
                                  f"given without it")


def run(args) -> int:
    from ..capabilities.decoding import decode, render_decoding
    from ..capabilities.files import write_json
    from ..images import load_image, pixels

    _ttt_options(args)
    device = common.pick_device(args.device)
    model, layout = cc.load_checkpoint(args, device)
    cfg = model.config
    kind = cc.input_kind(args, cfg)
    with common.setup_errors():
        if not cfg.rgb_head:
            raise ValueError(f"--checkpoint: {args.checkpoint!r} holds a model without an RGB head: nothing to decode")
        pil = load_image(args.image)
        px = pixels(pil, cfg, crop=cc.CROPS[args.crop])
    ttt = None
    if args.ttt:
        model, ttt = _ttt(args, model, pil, px, kind, device)
    with common.setup_errors(common.TRAINER_FLAGS):
        dec = decode(model, None, px=px, kind=kind, backend=args.backend)
        path = render_decoding(dec, args.out)
    info = {"image": str(args.image), "checkpoint": str(args.checkpoint), "layout": layout, "input": kind,
            "crop": args.crop, "grid": cfg.grid, "psnr_db": dec.psnr, "mse": dec.mse,
            "max_cell_error": float(dec.error.max()), "ttt": ttt}
    write_json(f"{args.out}/decode.json", info)
    print(f"PSNR {dec.psnr:.2f} dB (MSE {dec.mse:.4g} over {cfg.grid}x{cfg.grid} cells, values in [0, 1], input "
          f"{kind}{', after TTT' if ttt else ''}); wrote {path}", flush=True)
    return 0


def _ttt(args, model, pil, px, kind, device):
    """The model after TTT on the image (the trunk trained, the RGB head kept) and a summary."""
    from ..capabilities.decoding import with_weights
    from ..capabilities.inputs import student_input
    from ..ttt import TestTimeTrainer

    if not model.config.pool:
        raise common.CLIError("--ttt: the checkpoint's model has no pool; TTT regresses the pooled feature")
    with common.setup_errors(common.TRAINER_FLAGS):     # the options, before the teacher loads
        trainer = TestTimeTrainer(model, steps=args.steps, lr=args.lr, backend=args.backend or None,
                                  normalize_target=args.normalize_target, precision=args.precision)
        if trainer.engine is None:
            raise ValueError("--backend: --ttt runs on the engine; expected torch, triton or cuda, got reference")
    teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    if teacher.random_weights:
        common.eprint(f"!! teacher {teacher.name} has RANDOM weights (--pretrained none): the TTT target "
                      f"it gives is meaningless !!")
    with common.setup_errors():
        if teacher.dim != model.config.dim:
            raise ValueError(f"--teacher: {teacher.name} embeds in {teacher.dim} dims, the model's D is "
                             f"{model.config.dim}")
        target = teacher.embed_images([pil])[0].to(device)
        traj = trainer.trajectory(student_input(px[None].to(device), kind), target[None], (), weights=True)
    losses = [float(v) for v in traj.losses[0]]
    common.eprint(f"apm-fast decode: TTT {args.steps} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    return (with_weights(model, {k: v[0] for k, v in traj.weights.items()}),
            {"teacher": teacher.name, "random_teacher": teacher.random_weights, "steps": args.steps, "lr": args.lr,
             "backend": trainer.backend, "precision": trainer.precision, "moments": trainer.moments,
             "teacher_precision": teacher.image_precision, "losses": losses})
