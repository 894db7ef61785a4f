"""``apm-fast ttt IMAGES...``: test-time train on each image and classify it zero-shot.

One JSON line per image goes to ``--out`` or to stdout. ``--out FILE`` is restart-safe: lines are
appended to a per-process file beside it as images finish (flushed and fsynced), an earlier run's
lines are skipped, a torn last line is cut, a run with other settings is refused, a FILE holding
lines that are not results is refused, and at the end (or on Ctrl-C, one process) the lines are
merged into FILE in input order (one path for one process and for torchrun's ranks, see
:mod:`.sharded`). A diverged training is marked ``"diverged": true`` (its non-finite numbers
as null; strict JSON) and counts in the exit code like a skipped image. A file that cannot be read is reported on stderr and
skipped; the others are still processed, and the exit code is then 1.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) the images are split by rank and each rank
runs the same pipeline (``apm_fast.classify.iter_classify``) on its share; see :mod:`.sharded`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import capability_common as cc
from . import common, sharded
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
    cc.add_input_args(p, crop_default="center", kinds=False)     # the student's view of each image
    p.add_argument("--out", default="-", metavar="FILE.jsonl",
                   help="results file (default: stdout, a line as each image finishes; required under "
                        "torchrun). Lines go to FILE.jsonl.parts/ as images finish and into FILE.jsonl, in "
                        "input order, when the run ends or is interrupted (Ctrl-C); images already in it "
                        "are skipped, so the same command run again goes on. A file holding other lines "
                        "is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from ..images import find_images

    with common.setup_errors():
        paths = find_images(args.images)
    # before any long work (the teacher, the class texts): the images' keys, where the results go
    keys = sharded.input_keys(paths) if args.out != "-" else None
    sharded.check_out(args.out, paths, args.classes if os.path.isfile(str(args.classes)) else None)
    shards = sharded.start(args, keys)           # None unless launched by torchrun with WORLD_SIZE > 1
    try:
        return _run(args, paths, keys, shards)
    finally:
        if shards is not None:
            shards.close()


def _run(args, paths, keys, shards) -> int:
    from ..classify import iter_classify
    from ..teachers import resolve_classes, resolve_templates

    device = shards.device if shards is not None else common.pick_device(args.device)
    common.check_trainer_args(args, device)      # before the teacher: a bad option is refused at once
    teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    if teacher.random_weights and (shards is None or shards.rank == 0):
        eprint(common.random_teacher_banner(teacher, "--pretrained none"))
    with common.setup_errors():
        classes = resolve_classes(args.classes)
        templates = resolve_templates(args.templates)
    preset_name, config = common.build_config(args, teacher.dim)
    trainer = common.build_trainer(config, args, device)
    run_info = {
        "teacher": teacher.name, "pretrained": teacher.pretrained, "random_teacher": teacher.random_weights,
        "preset": preset_name, "grid": config.grid, "patch": config.patch, "hidden": list(config.hidden),
        "heads": config.heads, "dim": config.dim, "steps": args.steps, "lr": args.lr,
        "normalize_target": args.normalize_target, "templates": args.templates, "crop": args.crop,
        "classes": len(classes), "classes_sha256": common.class_list_id(classes), "backend": trainer.backend,
        "precision": trainer.precision, "moments": trainer.moments, "teacher_precision": teacher.image_precision,
        "device": str(device), "seed": args.seed,
        **common.code_version(),
    }
    with common.setup_errors():  # class embeddings once, before the first image
        teacher.class_embeddings(classes, templates)

    def results(todo, bar):
        """``(position in todo, JSON line or None for an unreadable image)`` as images finish."""
        info = dict(run_info, students=trainer.students_for(len(todo)))
        with common.setup_errors():
            for r in iter_classify(trainer, todo, teacher, classes, templates=templates, topk=args.topk,
                                   crop=cc.CROPS[args.crop]):
                if r.error is not None:
                    bar.write(f"apm-fast ttt: skipped {todo[r.index]}: {r.error}", file=sys.stderr)
                    yield r.index, None
                    continue
                bar.set_postfix_str(f"{r.top1[:24]} loss {r.final_loss:.3g}", refresh=False)
                line = r.to_dict()
                del line["index"]
                line["run"] = info
                yield r.index, line

    if args.out != "-":              # one restart-safe writer, torchrun's ranks or one process
        if shards is None:
            shards = sharded.Shards(None, keys, device)
        return shards.write(results, args, run_info)
    return _write(results, paths, args)


def progress_bar(args, total, *, enabled=True):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=args.no_progress or not enabled,
                dynamic_ncols=True)


def _write(results, paths, args) -> int:
    """``--out -``: every line to stdout as each image finishes."""
    failed = written = diverged = 0
    with progress_bar(args, len(paths)) as bar:
        for _, line in results(paths, bar):
            if line is None:
                failed += 1
            else:
                sys.stdout.write(json.dumps(line, allow_nan=False) + "\n")
                sys.stdout.flush()
                written += 1
                diverged += bool(line.get("diverged"))
            bar.update(1)
    eprint(f"apm-fast ttt: {written} result(s) written to stdout"
           + (f", {failed} image(s) skipped (see above)" if failed else "")
           + (f", {diverged} diverged (\"diverged\": true)" if diverged else ""))
    return 1 if failed or diverged else 0
