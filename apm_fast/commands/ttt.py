"""``apm-fast ttt IMAGES...``: test-time train on each image and classify it zero-shot.

One JSON line per image goes to ``--out`` (appended and flushed after every image, so a crash
loses nothing already done) or to stdout. A file that cannot be read is reported on stderr and
skipped; the others are still processed, and the exit code is then 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from . import common
from .common import eprint

HELP = "test-time train on images and classify them zero-shot (one JSON line per image)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ttt", help=HELP, description=HELP + ". Directories are searched for image files.",
        epilog="example: apm-fast ttt photos/ --teacher ViT-B-16 --pretrained openai "
               "--classes imagenet --out results.jsonl")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files or directories")
    common.add_teacher_args(p)
    common.add_student_args(p)
    p.add_argument("--out", default="-", metavar="FILE.jsonl",
                   help="append results here (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@contextlib.contextmanager
def _open_out(path):
    if path == "-":
        yield sys.stdout
        return
    try:
        f = open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise common.CLIError(f"--out: cannot open {path!r} for appending ({exc})")
    with f:
        yield f


def run(args) -> int:
    from tqdm import tqdm

    from ..images import ImageLoadError, find_images
    from ..teachers import resolve_classes, resolve_templates

    with common.setup_errors():
        paths = find_images(args.images)
    device = common.pick_device(args.device)
    teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    if teacher.random_weights:
        eprint(common.random_teacher_banner(teacher, "--pretrained none"))
    with common.setup_errors():
        classes = resolve_classes(args.classes)
        templates = resolve_templates(args.templates)
    preset_name, config = common.build_config(args, teacher.dim)
    trainer, backend = common.build_trainer(config, args, device)
    run_info = {
        "teacher": teacher.name, "pretrained": teacher.pretrained, "random_teacher": teacher.random_weights,
        "preset": preset_name, "grid": config.grid, "patch": config.patch, "hidden": list(config.hidden),
        "dim": config.dim, "steps": args.steps, "lr": args.lr, "templates": args.templates,
        "classes": len(classes), "backend": backend, "device": str(device), "seed": args.seed,
    }
    with common.setup_errors():  # class embeddings once, before the first image
        teacher.class_embeddings(classes, templates)

    failed = written = 0
    with _open_out(args.out) as out, tqdm(total=len(paths), unit="img", file=sys.stderr,
                                          disable=args.no_progress, dynamic_ncols=True) as bar:
        for path in paths:
            try:
                (res,) = trainer.classify([path], teacher, classes, templates=templates, topk=args.topk)
            except (ImageLoadError, OSError, ValueError) as exc:
                failed += 1
                bar.write(f"apm-fast ttt: skipped {path}: {exc}", file=sys.stderr)
            else:
                line = res.to_dict()
                line["run"] = run_info
                out.write(json.dumps(line) + "\n")
                out.flush()
                written += 1
                bar.set_postfix_str(f"{res.top1[:24]} loss {res.final_loss:.3g}", refresh=False)
            bar.update(1)
    dest = "stdout" if args.out == "-" else args.out
    eprint(f"apm-fast ttt: {written} result(s) written to {dest}"
           + (f", {failed} image(s) skipped (see above)" if failed else ""))
    return 1 if failed else 0
