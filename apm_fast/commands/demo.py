"""``apm-fast demo``: test-time training on a few real photos shipped with scikit-image.

On a GPU it runs the full ``ttt-b16`` student (20 steps) against the 1000 ImageNet classes. On a
CPU it runs a reduced student (grid 16, widths 2048,1024,512, 10 steps) against 16 ImageNet
classes, so that it finishes in well under two minutes on two cores (``--full`` for the real
sizes); the table header says which. The teacher's weights default to the ``openai`` tag; where
they cannot be had (offline), the demo goes on with random teacher weights and says so loudly.
"""
from __future__ import annotations

import argparse
import time

from . import common

HELP = "test-time training on a few photos shipped with scikit-image; prints a table"

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")   # skimage.data, inside the wheel

# ImageNet classes (open_clip's names) for the CPU demo: the photos' likely labels and distractors.
CPU_CLASSES = ("tabby cat", "tiger cat", "Persian cat", "espresso", "coffee mug", "tea cup", "missile",
               "space shuttle", "suit", "Golden Retriever", "goldfish", "pizza", "banana", "volcano",
               "umbrella", "laptop computer")

CPU_OVERRIDES = dict(grid=16, hidden=(2048, 1024, 512))
CPU_STEPS, FULL_STEPS = 10, 20


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="ViT-B-16", help="open_clip model name (default: %(default)s)")
    p.add_argument("--pretrained", default="openai", metavar="TAG|PATH|none",
                   help="teacher weights; falls back to random weights when they cannot be had "
                        "(default: %(default)s)")
    p.add_argument("--classes", default=None, metavar="imagenet|FILE",
                   help="class names (default: imagenet on a GPU, 16 ImageNet classes on a CPU)")
    p.add_argument("--steps", type=common.positive_int, default=None,
                   help=f"Adam steps per image (default: {FULL_STEPS} on a GPU, {CPU_STEPS} on a CPU)")
    p.add_argument("--full", action="store_true", help="full preset and all ImageNet classes on a CPU too")
    p.add_argument("--backend", default=None, help=common.BACKEND_HELP)
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--seed", type=common.seed, default=0,
                   help="seed of the student's (and a random teacher's) init, in [0, 2**63 - 1]")
    return p


def _photos():
    try:
        import skimage.data
    except ImportError as exc:
        raise common.CLIError(f"the demo's photos come with scikit-image: pip install scikit-image ({exc})")
    from ..images import to_pil

    return [(name, to_pil(getattr(skimage.data, name)(), name=name)) for name in PHOTOS]


def _teacher(args, device):
    from ..teachers import WeightsUnavailable

    why = ""
    try:
        teacher = common.build_teacher(args.teacher, args.pretrained, device, args.seed)
    except common.CLIError as exc:
        if not isinstance(exc.__cause__, WeightsUnavailable):
            raise
        print(f"apm-fast demo: {exc}\n-> going on with RANDOM teacher weights", flush=True)
        why = f"{args.pretrained!r} weights unavailable"
        teacher = common.build_teacher(args.teacher, None, device, args.seed)
    if teacher.random_weights:
        why = why or "--pretrained none"
    return teacher, why


def run(args) -> int:
    t_start = time.perf_counter()
    device = common.pick_device(args.device)
    small = device.type == "cpu" and not args.full
    photos = _photos()
    teacher, why = _teacher(args, device)

    # the shared student options, at the demo's sizes
    args.preset, args.patch, args.heads = "auto", None, None
    args.grid, args.hidden = (CPU_OVERRIDES["grid"], CPU_OVERRIDES["hidden"]) if small else (None, None)
    args.steps = args.steps or (CPU_STEPS if small else FULL_STEPS)
    args.lr, args.normalize_target = 1e-4, False
    preset_name, config = common.build_config(args, teacher.dim)
    args.students, args.precision = None, None
    trainer = common.build_trainer(config, args, device)
    classes = args.classes or (CPU_CLASSES if small else "imagenet")

    from ..teachers import resolve_classes

    with common.setup_errors():
        names = resolve_classes(classes)
        t0 = time.perf_counter()
        teacher.class_embeddings(names, "single")
        text_s = time.perf_counter() - t0

    size = (f"{preset_name} reduced for the CPU (grid {config.grid}, hidden "
            f"{','.join(map(str, config.hidden))}; --full for the real sizes)" if small else preset_name)
    weights = f"RANDOM weights ({why})" if teacher.random_weights else f"weights {teacher.pretrained!r}"
    print(f"APM test-time training demo: student {size}, {args.steps} Adam steps, backend {trainer.backend} "
          f"({trainer.precision}), "
          f"device {device}")
    print(f"teacher {teacher.name}, {weights}; {len(names)} ImageNet classes, prompt "
          f"'a photo of a {{c}}.' (text embeddings {text_s:.1f} s, once)")
    if teacher.random_weights:
        print(common.random_teacher_banner(teacher))
    rows = []
    from ..classify import classify

    with common.setup_errors():
        results = classify(trainer, [pil for _, pil in photos], teacher, names, templates="single", topk=1)
        for (name, _), res in zip(photos, results):
            rows.append((name, f"{res.top1} ({res.topk[0][1]:.2f})",
                         f"{res.teacher_top1} ({res.teacher_topk[0][1]:.2f})",
                         f"{res.losses[0]:.4g} -> {res.final_loss:.4g}",
                         f"{res.teacher_ms:.0f}", f"{res.ttt_ms:.0f}"))
    header = ("image", "APM top-1 (p)", "teacher top-1 (p)", "loss first -> last", "teacher ms", "TTT ms")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0
