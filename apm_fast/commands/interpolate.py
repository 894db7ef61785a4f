"""``apm-fast interpolate A B --checkpoint CKPT --out DIR``: perceptual interpolation.

The trigger (the conv's one value per cell, all the MLP ever sees of an image) is mixed from A's
to B's, v_i = v_A + (v_B - v_A) i / n for ``--frames`` n + 1 values of i, and every column is
asked with it: ``DIR/interpolation.png`` shows the RGB read-outs between A and B (first row) and a
PCA picture of each grid (fitted on the two end frames; second row), ``DIR/interpolation.gif``
plays them there and back. The end frames are exactly the decodings of A and B.
"""
from __future__ import annotations

import argparse

from . import capability_common as cc
from . import common

HELP = "interpolate two images' triggers and decode every step (PNG row and GIF)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = cc.command_parser(subparsers, "interpolate", HELP, __doc__,
                          "apm-fast interpolate a.jpg b.jpg --checkpoint apm_coco.pth --frames 8 --out interp/",
                          {"A": "the first image", "B": "the second image"},
                          "folder for interpolation.png, .gif and .json")
    p.add_argument("--frames", type=_frames, default=8, help="frames, the two ends included (default: %(default)s)")
    p.add_argument("--size", type=common.positive_int, default=112, help="panel size in pixels (default: %(default)s)")
    cc.add_checkpoint_args(p)
    cc.add_input_args(p, crop_default="stretch")
    return p


def _frames(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (the two ends included), got {text!r}")
    return v


def run(args) -> int:
    from ..capabilities.files import write_json
    from ..capabilities.interpolation import interpolate, render_interpolation
    from ..images import load_image

    device = common.pick_device(args.device)
    model, layout = cc.load_checkpoint(args, device)
    kind = cc.input_kind(args, model.config)
    with common.setup_errors():
        a, b = load_image(args.a), load_image(args.b)
        res = interpolate(model, a, b, args.frames, kind=kind, crop=cc.CROPS[args.crop], backend=args.backend)
        files = render_interpolation(res, args.out, size=args.size)
    write_json(f"{args.out}/interpolation.json",
               {"a": str(args.a), "b": str(args.b), "checkpoint": str(args.checkpoint), "layout": layout,
                "frames": args.frames, "weights": res.weights, "input": kind, "crop": args.crop,
                "rgb_head": res.rgb is not None})
    if res.rgb is None:
        common.eprint("apm-fast interpolate: the model has no RGB head: the PNG shows the grids' PCA only")
    common.eprint(f"apm-fast interpolate: {args.frames} frames; wrote {files['png']}, {files['gif']}")
    return 0
