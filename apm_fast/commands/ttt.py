"""``apm-fast ttt IMAGES...``: test-time train on each image and classify it zero-shot.

One JSON line per image goes to ``--out`` (appended and flushed after every image, so a crash
loses nothing already done) or to stdout. A file that cannot be read is reported on stderr and
skipped; the others are still processed, and the exit code is then 1.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) the images are split by rank and each rank
runs the same per-image (or batched pipeline) code on its share; see :mod:`.sharded`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

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
    p.add_argument("--out", default="-", metavar="FILE.jsonl",
                   help="append results here (default: stdout; required under torchrun, where "
                        "images already in it are skipped)")
    p.add_argument("--students", type=common.positive_int, default=None, metavar="N",
                   help="train N images side by side in the batched GPU pipeline (default on a GPU: "
                        "as many as fit in memory; giving N uses the pipeline on a CPU too)")
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
    from ..images import find_images

    with common.setup_errors():
        paths = find_images(args.images)
    shards = sharded.start(args, paths)          # None unless launched by torchrun with WORLD_SIZE > 1
    try:
        return _run(args, paths, shards)
    finally:
        if shards is not None:
            shards.close()


def _run(args, paths, shards) -> int:
    from ..teachers import resolve_classes, resolve_templates

    device = shards.device if shards is not None else common.pick_device(args.device)
    teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    if teacher.random_weights and (shards is None or shards.rank == 0):
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
    setup = (args, teacher, classes, templates, trainer, run_info)
    if _batched(args, device, backend):
        results = _batched_results(*setup, backend)
    else:
        results = _per_image_results(*setup)
    if shards is not None:
        return shards.write(results, args)
    return _write(results, paths, args)


def progress_bar(args, total, *, enabled=True):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=args.no_progress or not enabled,
                dynamic_ncols=True)


def _write(results, paths, args) -> int:
    """One process: every line to --out (appended, flushed per image) or stdout, in input order."""
    failed = written = 0
    with _open_out(args.out) as out, progress_bar(args, len(paths)) as bar:
        for _, line in results(paths, bar):
            if line is None:
                failed += 1
            else:
                out.write(json.dumps(line) + "\n")
                out.flush()
                written += 1
            bar.update(1)
    dest = "stdout" if args.out == "-" else args.out
    eprint(f"apm-fast ttt: {written} result(s) written to {dest}"
           + (f", {failed} image(s) skipped (see above)" if failed else ""))
    return 1 if failed else 0


def _line(res, run_info) -> dict:
    line = res.to_dict()
    line["run"] = run_info
    return line


def _skipped(bar, path, why):
    bar.write(f"apm-fast ttt: skipped {path}: {why}", file=sys.stderr)


# Both ways of computing give ``results(paths, bar)``: an iterator of ``(position in paths, JSON
# line or None for an unreadable image)``, in whatever order the images finish.
def _per_image_results(args, teacher, classes, templates, trainer, run_info):
    from ..images import ImageLoadError

    def results(paths, bar):
        for j, path in enumerate(paths):
            try:
                (res,) = trainer.classify([path], teacher, classes, templates=templates, topk=args.topk)
            except (ImageLoadError, OSError, ValueError) as exc:
                _skipped(bar, path, exc)
                yield j, None
            else:
                bar.set_postfix_str(f"{res.top1[:24]} loss {res.final_loss:.3g}", refresh=False)
                yield j, _line(res, run_info)
    return results


def _batched(args, device, backend) -> bool:
    """The batched pipeline (DataLoader workers, teacher and students on their own streams, many
    images side by side) on a GPU, or wherever --students is given; it needs a fused backend."""
    from ..backends import get_backend

    return (device.type == "cuda" or args.students is not None) and hasattr(get_backend(backend), "primitives")


def _batched_results(args, teacher, classes, templates, trainer, run_info, backend):
    from ..classify import Classification
    from ..engine import TTTEngine, iter_classify_batches

    # the pipeline's logits are 100 cos(., class text), as in apm_fast.classify
    engine = TTTEngine(trainer.model, steps=args.steps, lr=args.lr, backend=backend, students=args.students,
                       normalize_target=args.normalize_target, snapshot=trainer.snapshot)
    k = min(args.topk, len(classes))

    def top(logits):
        vals, idx = logits.softmax(-1).topk(k)
        return [(classes[j], float(v)) for v, j in zip(vals.tolist(), idx.tolist())]

    def results(paths, bar):
        info = dict(run_info, students=engine.students_for(len(paths)))
        with common.setup_errors():
            for br in iter_classify_batches(paths, trainer.model, teacher, classes, templates=templates,
                                            engine=engine):
                for i, why in br.failed:
                    _skipped(bar, paths[i], why)
                    yield i, None
                for row, i in enumerate(br.indices.tolist()):
                    res = Classification(image=str(paths[i]), topk=top(br.logits[row]),
                                         teacher_topk=top(br.teacher_logits[row]),
                                         losses=[float(v) for v in br.losses[row].tolist()],
                                         teacher_ms=br.teacher_ms, ttt_ms=br.ttt_ms)
                    bar.set_postfix_str(f"{res.top1[:24]} loss {res.final_loss:.3g}", refresh=False)
                    yield i, _line(res, info)
    return results
