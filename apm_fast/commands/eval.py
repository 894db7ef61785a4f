"""``apm-fast eval ROOT --dataset ID ...``: accuracy of APM's test-time training beside zero-shot,
the prompt ensemble, TPT and ZERO, on labelled datasets (see :mod:`apm_fast.evaluate`).

Writes ``--out DIR``: records.jsonl (one line per image as it finishes; a killed run continues
where it stopped when started again), summary.csv, summary.md and summary.png. Exit codes: 0 done,
1 some images could not be read (reported, the others done), 2 bad arguments or set-up.
"""
from __future__ import annotations

import argparse

from . import capability_common as cc
from . import common

HELP = "accuracy of APM's TTT beside zero-shot, ensemble, TPT and ZERO on labelled datasets"


class _AppendOnce(argparse.Action):
    """``--dataset``: repeatable, each value once (a set given twice would be written twice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = list(getattr(namespace, self.dest, None) or [])
        if values in given:
            parser.error(f"argument {option_string}: {values!r} is given twice; each dataset is evaluated once")
        setattr(namespace, self.dest, given + [values])


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..datasets import DATASETS, IMAGENET_C_CORRUPTIONS
    from ..evaluation import METHODS

    p = subparsers.add_parser(
        "eval", help=HELP, description=HELP + ". Datasets are laid out as the TPT/CoOp harnesses "
        "have them under ROOT (see apm_fast/datasets.py).",
        epilog="example: apm-fast eval ~/data --dataset imagenet-a --methods zeroshot,ensemble,apm,tpt,zero "
               "--teacher ViT-B-16 --pretrained openai --out runs/a")
    p.add_argument("root", metavar="ROOT", help="the folder holding the datasets (for 'folder': the ImageFolder)")
    p.add_argument("--dataset", action=_AppendOnce, required=True, choices=sorted(DATASETS), metavar="ID",
                   help=f"a dataset id, repeatable (each id once): {', '.join(sorted(DATASETS))}")
    p.add_argument("--methods", default="zeroshot,ensemble,apm",
                   help=f"comma-separated, among {','.join(METHODS)} (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (records, summary); an existing "
                   "run with the same settings is continued")
    p.add_argument("--limit", type=common.positive_int, default=None, metavar="N",
                   help="N images per dataset (a seeded shuffle: many classes, the same N every run)")
    p.add_argument("--corruption", choices=IMAGENET_C_CORRUPTIONS, default=None, help="imagenet-c only")
    p.add_argument("--severity", type=int, choices=range(1, 6), default=None, help="imagenet-c only")
    p.add_argument("--teacher", default="ViT-B-16", help="open_clip model name or config .json (default: %(default)s)")
    p.add_argument("--pretrained", default="openai", metavar="TAG|PATH|none",
                   help="teacher weights: a tag, a checkpoint file, or 'none' (default: %(default)s)")
    p.add_argument("--classes", default=None, metavar="FILE", help="class names in label order ('folder' only)")
    g = p.add_argument_group("APM")
    g.add_argument("--preset", type=common.preset_or_auto, default="auto", help="student preset; 'auto' follows the teacher's width")
    g.add_argument("--grid", type=common.positive_int, help="override the preset's grid G")
    g.add_argument("--hidden", type=common.hidden_widths, metavar="W1,W2,...", help="override the MLP widths")
    g.add_argument("--steps", type=common.positive_int, default=20,
                   help="Adam steps per image (default: %(default)s; the paper does not publish its count)")
    g.add_argument("--lr", type=common.learning_rate, default=1e-4, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--precision", default=None, choices=common.PRECISION_CHOICES, help=common.PRECISION_HELP)
    g.add_argument("--moments", default="fp32", choices=("fp32", "bf16"),
                   help="Adam's moments: fp32 (torch.optim.Adam's, the default) or bf16 (half their memory "
                        "and traffic; the torch, triton and cuda backends; effect: docs/engine.md)")
    g.add_argument("--apm-templates", default="ensemble", choices=("single", "ensemble"),
                   help="the class texts APM's feature is classified against (default: %(default)s)")
    cc.add_input_args(p, crop_default="center", kinds=False)     # the student's view of each image
    b = p.add_argument_group("TPT and ZERO")
    b.add_argument("--views", type=common.positive_int, default=64, help="the image and its augmented views (64)")
    b.add_argument("--tpt-lr", type=common.learning_rate, default=5e-3, help="TPT's AdamW lr (default: %(default)s)")
    p.add_argument("--seed", type=common.seed, default=0, help="seed of the student's init, a random teacher and the views")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from ..evaluation import EvalSettings, evaluate

    device = common.pick_device(args.device)
    common.check_trainer_args(args, device)      # --precision with --moments, before the teacher
    with common.setup_errors():
        settings = EvalSettings(methods=tuple(args.methods.split(",")), teacher=args.teacher,
                                pretrained=None if str(args.pretrained).lower() in ("none", "random", "")
                                else args.pretrained,
                                preset=args.preset, grid=args.grid, hidden=args.hidden, steps=args.steps,
                                lr=args.lr, seed=args.seed, precision=args.precision, moments=args.moments,
                                apm_templates=args.apm_templates, views=args.views, tpt_lr=args.tpt_lr,
                                crop=args.crop)

    def teacher():                   # built once the datasets and --out are checked
        t = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
        if t.random_weights:
            common.eprint(common.random_teacher_banner(t, "--pretrained none"))
        return t

    skipped = []
    with common.setup_errors():
        rows = evaluate(args.root, args.dataset, teacher=teacher, out=args.out, settings=settings,
                        limit=args.limit, corruption=args.corruption, severity=args.severity,
                        classes_file=args.classes, device=device, progress=None if not args.no_progress else False,
                        log=lambda line: (skipped.append(line) if "could not be read" in line else None,
                                          common.eprint(line)))
    for r in rows:
        common.eprint(f"{r['dataset']:>24s} {r['method']:>9s}  top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}  "
                      f"{r['images']} images")
    common.eprint(f"apm-fast eval: summary in {args.out}/summary.md")
    return 1 if skipped else 0
