"""``apm-fast decode IMAGE --checkpoint CKPT --out DIR``: the RGB head's reconstruction of an image.

Writes ``DIR/decode.png`` (the input, the cell averages the head is asked for, its reconstruction,
the per-cell error map; the paper's Figure 5 (ii)) and ``DIR/decode.json``, and prints the PSNR.
CKPT: a model saved by apm-fast (``APM.save``, ``apm-fast distill``'s ``model.safetensors``) or the
authors' state dict (their COCO checkpoint: no options needed). ``--ttt``: for a TTT model with an
RGB head (pool and RGB head), test-time train it on the image first (teacher and training
options as ``apm-fast ttt``; the trunk is trained, the RGB head is the checkpoint's).
"""
from __future__ import annotations

import argparse

from . import capability_common as cc
from . import common

HELP = "decode an image's colours through a model's RGB head; PSNR and an error map"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = cc.command_parser(subparsers, "decode", HELP, __doc__,
                          "apm-fast decode photo.jpg --checkpoint apm_coco.pth --out decoded/",
                          {"IMAGE": "one image file"}, "folder for decode.png and decode.json")
    cc.add_checkpoint_args(p)
    cc.add_input_args(p, crop_default="stretch")
    g = p.add_argument_group("test-time training (--ttt)")
    g.add_argument("--ttt", action="store_true", help="test-time train the model on the image first (needs a pool)")
    g.add_argument("--teacher", default="ViT-B-16", help="open_clip teacher of --ttt (default: %(default)s)")
    g.add_argument("--pretrained", default="openai", metavar="TAG|PATH|none",
                   help="its weights (default: %(default)s)")
    g.add_argument("--steps", type=common.positive_int, default=20, help="Adam steps of --ttt (default: %(default)s)")
    g.add_argument("--lr", type=common.learning_rate, default=1e-4, help="their learning rate (default: %(default)s)")
    g.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32", "fp64"),
                   help="GEMM dtype of --ttt (default: bf16 on a GPU, fp32 on a CPU)")
    g.add_argument("--normalize-target", action="store_true", help="regress the unit-norm teacher embedding")
    g.add_argument("--seed", type=common.seed, default=0, help="seed of a random teacher (default: %(default)s)")
    return p


def run(args) -> int:
    from ..capabilities.decoding import decode, render_decoding
    from ..capabilities.files import write_json
    from ..images import load_image, pixels

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
    with common.setup_errors():
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
    teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    if teacher.random_weights:
        common.eprint(f"!! teacher {teacher.name} has RANDOM weights (--pretrained none): the TTT target "
                      f"it gives is meaningless !!")
    with common.setup_errors():
        if teacher.dim != model.config.dim:
            raise ValueError(f"--teacher: {teacher.name} embeds in {teacher.dim} dims, the model's D is "
                             f"{model.config.dim}")
        trainer = TestTimeTrainer(model, steps=args.steps, lr=args.lr, backend=args.backend or None,
                                  normalize_target=args.normalize_target, precision=args.precision)
        if trainer.engine is None:
            raise ValueError("--backend: --ttt runs on the engine; use torch, triton or cuda, not reference")
        target = teacher.embed_images([pil])[0].to(device)
        traj = trainer.trajectory(student_input(px[None].to(device), kind), target[None], (), weights=True)
    losses = [float(v) for v in traj.losses[0]]
    common.eprint(f"apm-fast decode: TTT {args.steps} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    return (with_weights(model, {k: v[0] for k, v in traj.weights.items()}),
            {"teacher": teacher.name, "random_teacher": teacher.random_weights, "steps": args.steps, "lr": args.lr,
             "losses": losses})
