"""``apm-fast islands IMAGE --out DIR``: the islands of agreement (the paper's Figure 3).

Test-time trains a student on one image against a CLIP teacher's embedding (as ``apm-fast ttt``,
same teacher and student options) from the fixed init, keeps the grid features after every
``--every`` iterations (or ``--at``), and writes ``DIR/islands.png`` (the input, one panel per
captured iteration, the loss curve), ``DIR/islands.gif`` (one frame per iteration) and
``DIR/islands.json`` (iterations, losses, settings). Colours: PCA over the cells fitted on the
last captured iteration and applied to all (``--projection tsne``: t-SNE over all of them, needs
scikit-learn), so that colours mean the same in every panel. The image is stretched to the
student's square grid by default (the authors' TTT input): the panels keep the input's aspect.
"""
from __future__ import annotations

import argparse
import time

from . import capability_common as cc
from . import common

HELP = "watch the grid features form during TTT on one image (islands of agreement, a PNG strip and a GIF)"


def _steps_list(text: str):
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        vals = []
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts >= 0 like 0,50,250, got {text!r}")
    return vals


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = cc.command_parser(subparsers, "islands", HELP, __doc__,
                          "apm-fast islands photo.jpg --steps 250 --every 50 --out islands/",
                          {"IMAGE": "one image file"}, "folder for islands.png, islands.gif, islands.json")
    common.add_teacher_args(p)
    common.add_student_args(p, steps_default=250)
    g = p.add_argument_group("islands")
    g.add_argument("--every", type=common.positive_int, default=50,
                   help="capture the grid every this many iterations (default: %(default)s)")
    g.add_argument("--at", type=_steps_list, default=None, metavar="K1,K2,...",
                   help="capture after exactly these step counts instead (0: the init)")
    g.add_argument("--projection", default="pca", choices=("pca", "tsne"),
                   help="features to colours: PCA fitted on the last iteration, or t-SNE (default: %(default)s)")
    g.add_argument("--height", type=common.positive_int, default=160, help="panel height in pixels (default: %(default)s)")
    cc.add_input_args(p, crop_default="stretch", kinds=False)     # the TTT input (ImageNet mean/std)
    cc.hide(p, "classes", "templates", "topk", "students")
    # islands runs on the engine: no reference backend
    cc.set_help(p, common.BACKEND_HELP.replace("reference|torch", "torch", 1), "backend")
    return p


def run(args) -> int:
    from ..capabilities.agreement import islands, iterations, render_islands
    from ..capabilities.files import write_json
    from PIL import Image

    from ..images import load_image, pixels, preprocess

    device = common.pick_device(args.device)
    with common.setup_errors():
        pil = load_image(args.image)
        its = iterations(args.steps, args.every, args.at)
        if getattr(args, "backend", None) == "reference":
            raise ValueError("--backend: islands runs on the engine; use torch, triton or cuda, not reference")
    common.check_trainer_args(args, device)          # before the teacher loads
    teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    if teacher.random_weights:
        common.eprint(f"!! teacher {teacher.name} has RANDOM weights (--pretrained none): the target it "
                      f"gives, and so the features below, are meaningless !!")
    preset_name, config = common.build_config(args, teacher.dim)
    args.students = 1
    trainer = common.build_trainer(config, args, device)
    with common.setup_errors():
        if trainer.engine is None:
            raise ValueError("--backend: islands runs on the engine; use torch, triton or cuda, not reference")
        x = preprocess(pil, config, crop=cc.CROPS[args.crop])
        target = teacher.embed_images([pil])[0].to(device)
        t0 = time.perf_counter()
        res = islands(trainer, x.to(device), target, its, projection=args.projection, seed=args.seed)
        ms = 1e3 * (time.perf_counter() - t0)
        # the panels show what the grid covers: the whole image (stretched) or its centre square
        shown = pil if args.crop == "stretch" else Image.fromarray(
            pixels(pil, config, crop="center").permute(1, 2, 0).numpy())
        files = render_islands(res, shown, args.out, height=args.height)
    info = {"image": str(args.image), "iterations": res.iterations, "losses": res.losses,
            "projection": args.projection, "teacher": teacher.name, "pretrained": teacher.pretrained,
            "random_teacher": teacher.random_weights, "preset": preset_name, "grid": config.grid,
            "patch": config.patch, "hidden": list(config.hidden), "dim": config.dim, "steps": args.steps,
            "lr": args.lr, "crop": args.crop, "backend": trainer.backend, "precision": trainer.precision,
            "moments": trainer.moments, "teacher_precision": teacher.image_precision, "seed": args.seed, "ms": ms}
    write_json(f"{args.out}/islands.json", info)
    common.eprint(f"apm-fast islands: {args.steps} TTT steps ({trainer.backend}, {trainer.precision}) in {ms:.0f} ms "
                  f"with the projection; loss {res.losses[0]:.4g} -> {res.losses[-1]:.4g}; wrote {files['png']}, "
                  f"{files['gif']}")
    return 0
