"""``apm-fast distill IMAGES_DIR --out RUN_DIR``: SSL grid distillation from a DINOv2 teacher.

Trains an APM (preset ``ssl-l14``: no pool, RGB head) to predict the teacher's patch token at
every grid cell and the image's colour at every cell (the authors' COCO model), see
:mod:`apm_fast.capabilities.distillation`. Restart-safe: run the same command again after a kill and
it continues at the step after the last checkpoint (``--save-every`` steps, and every epoch's
end), with the same weights as an uninterrupted run; with more ``--epochs`` it trains on.
``--export PATH`` writes the model in the authors' state-dict layout when training is done.
Exit codes: 0 done; 1 done, but some images could not be read (listed on stderr).
"""
from __future__ import annotations

import argparse

from . import capability_common as cc
from . import common

HELP = "distill a DINOv2 teacher's patch tokens (and the image's RGB) into an APM grid (SSL)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = cc.command_parser(subparsers, "distill", HELP, __doc__,
                          "apm-fast distill coco/train2017 --teacher vit_large_patch14_dinov2 --preset ssl-l14 "
                          "--out runs/coco --epochs 10 --batch 32 --cache-features",
                          {"IMAGES": "image files or directories"},
                          "the run directory (a run there is continued)", out_metavar="RUN_DIR")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default="vit_large_patch14_dinov2",
                   help="a timm DINOv2 model name (timm.list_models('*dinov2*')), or a .json file "
                        "{\"architecture\": NAME, \"kwargs\": {...}} (default: %(default)s)")
    g.add_argument("--pretrained", default="default", metavar="TAG|PATH|none",
                   help="'default' (timm's tag for the model), another tag, a state-dict file (read "
                        "weights-only), or 'none' for random weights (default: %(default)s)")
    g.add_argument("--authors-shift", action="store_true",
                   help="cell l learns token l of [CLS, registers, patches] (the authors' [:-5] cut of "
                        "their COCO checkpoint) instead of patch l; for compatibility only")
    g.add_argument("--cache-features", action="store_true",
                   help="compute the teacher's targets once and keep them in RUN_DIR/features/ (fp16, "
                        "about 2 MB per image at the full sizes)")
    g = p.add_argument_group("student")
    g.add_argument("--preset", type=common.preset_name, default="ssl-l14", help="student preset (default: %(default)s); D follows the teacher")
    g.add_argument("--grid", type=common.positive_int, help="override the preset's grid G (the teacher runs at G x its patch)")
    g.add_argument("--patch", type=common.positive_int, help="override the preset's patch p")
    g.add_argument("--hidden", type=common.hidden_widths, metavar="W1,W2,...", help="override the MLP widths")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=common.positive_int, default=1, help="epochs (default: %(default)s)")
    g.add_argument("--batch", type=common.positive_int, default=8, help="images per step (default: %(default)s)")
    g.add_argument("--lr", type=common.learning_rate, default=1e-4, help="AdamW's learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=_non_negative, default=0.0,
                   help="AdamW's decoupled weight decay (default: %(default)s: the authors' Adam)")
    g.add_argument("--rgb-weight", type=_non_negative, default=1.0,
                   help="weight of the RGB loss (default: %(default)s, as the authors)")
    g.add_argument("--save-every", type=common.positive_int, default=200, metavar="STEPS",
                   help="steps between checkpoints; also at every epoch's end (default: %(default)s)")
    g.add_argument("--stop-after", type=common.positive_int, default=None, metavar="STEPS",
                   help="stop with a checkpoint after this many steps of this invocation (run again to go on)")
    g.add_argument("--export", default=None, metavar="PATH",
                   help="when done, also write the model as a torch state_dict in the authors' layout")
    g.add_argument("--backend", default=None, help=common.BACKEND_HELP)
    g.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                   help="bf16 autocast (the default on a GPU) or fp32 (the default on a CPU)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--seed", type=common.seed, default=0,
                   help="seed of the init, of every epoch's order and of a random teacher (default: %(default)s)")
    g.add_argument("--workers", type=int, default=None, help="image loader processes (default: 0 on a CPU, up to 8 on a GPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    cc.add_input_args(p, crop_default="center", auto=False)
    return p


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def run(args) -> int:
    import torch

    from ..capabilities.distillation import MODEL_FILE, DistillSettings, distill, export_official
    from ..config import preset
    from ..teachers.dinov2 import DINOv2Teacher

    device = common.pick_device(args.device)
    overrides = {k: getattr(args, k) for k in ("grid", "patch", "hidden") if getattr(args, k) is not None}
    with common.setup_errors():
        base = preset(args.preset, **overrides)
        settings = DistillSettings(epochs=args.epochs, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                                   rgb_weight=args.rgb_weight, authors_shift=args.authors_shift, input=args.input,
                                   crop=args.crop, seed=args.seed, save_every=args.save_every,
                                   cache_features=args.cache_features, backend=args.backend,
                                   precision=args.precision)
    torch.manual_seed(args.seed)
    with common.setup_errors(), common._quiet_teacher_logs():
        teacher = DINOv2Teacher(args.teacher, args.pretrained, grid=base.grid, device=device)
    if teacher.random_weights:
        common.eprint(f"!! teacher {teacher.name} has RANDOM weights (--pretrained none): the features it "
                      f"teaches are meaningless !!")
    with common.setup_errors():
        config = base.replace(dim=teacher.dim)
        common.eprint(f"apm-fast distill: student {args.preset} (grid {config.grid}, patch {config.patch}, hidden "
                      f"{','.join(map(str, config.hidden))}, D {config.dim}), teacher {teacher.name} at "
                      f"{teacher.image_size} px, {args.epochs} epoch(s) of batches of {args.batch}, device {device}")
        result = distill(args.images, teacher, args.out, config=config, settings=settings, device=device,
                         stop_after=args.stop_after, progress=not args.no_progress, num_workers=args.workers)
    if not result.finished:
        common.eprint(f"apm-fast distill: stopped after step {result.step} (--stop-after); run the same command "
                      f"again to continue")
    else:
        common.eprint(f"apm-fast distill: done, {result.step} steps; the model: {args.out}/{MODEL_FILE}"
                      + (f"; last epoch's loss {result.history[-1]['loss']:.5g}" if result.history else ""))
        if args.export:
            with common.setup_errors():
                export_official(result.model, args.export)
            common.eprint(f"apm-fast distill: exported the authors' layout to {args.export}")
    if result.skipped:
        common.eprint(f"apm-fast distill: {len(result.skipped)} image(s) could not be read and were skipped")
        return 1
    return 0

