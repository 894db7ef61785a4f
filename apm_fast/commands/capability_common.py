"""Options shared by the commands of the paper's other capabilities (``distill``, ``islands``,
``decode``, ``interpolate``): the input convention, the crop, a model checkpoint."""
from __future__ import annotations

import argparse

from . import common

CROPS = {"stretch": None, "center": "center"}


def command_parser(subparsers, name: str, help: str, doc: str, example: str, inputs: dict,
                   out_help: str, out_metavar: str = "DIR") -> argparse.ArgumentParser:
    """A capability command's parser: its help, its docstring as description, one example, its
    positional inputs (``{metavar: help}``, ``nargs="+"`` for a metavar ending in ``S``) and the
    required ``--out``."""
    p = subparsers.add_parser(name, help=help, description=doc, epilog=f"example: {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    for metavar, text in inputs.items():
        p.add_argument(metavar.lower(), metavar=metavar, help=text,
                       **({"nargs": "+"} if metavar.endswith("S") else {}))
    p.add_argument("--out", required=True, metavar=out_metavar, help=out_help)
    return p


def add_input_args(p: argparse.ArgumentParser, *, crop_default: str = "stretch", auto: bool = True,
                   kinds: bool = True):
    """``--input`` (the convention; ``kinds=False``: none, the command's is fixed) and ``--crop``."""
    g = p.add_argument_group("input")
    if kinds:
        g.add_argument("--input", default="auto" if auto else "ssl",
                       choices=(("auto",) if auto else ()) + ("ssl", "imagenet"),
                       help="the model's input convention: 'ssl' (the authors' SSL input: BGR, one min-max "
                            "scaling to [0, 1]; the RGB head predicts the same), 'imagenet' (RGB, ImageNet "
                            "mean/std)" + ("; 'auto': ssl for a model without a pool, imagenet for a TTT "
                                            "model" if auto else "") + " (default: %(default)s)")
    g.add_argument("--crop", default=crop_default, choices=tuple(CROPS),
                   help="'stretch' the whole image to the model's S x S (the authors' inference) or "
                        "'center' (shorter side to S, centre square) (default: %(default)s)")


def input_kind(args, config):
    from ..capabilities.inputs import default_input_kind

    return default_input_kind(config) if args.input == "auto" else args.input


def add_checkpoint_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="the model: a file written by apm-fast (APM.save, apm-fast distill's model.safetensors), or "
                        "the authors' state dict (a torch or safetensors file, config read off its shapes); "
                        "told apart by content, not by suffix")
    g.add_argument("--heads", type=common.positive_int, default=None,
                   help="the pool's heads of an authors' checkpoint with a pool (not in its shapes; default 8)")
    g.add_argument("--backend", default=None, help=common.BACKEND_HELP)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def load_checkpoint(args, device):
    from ..capabilities.decoding import load_model

    with common.setup_errors():
        model, layout = load_model(args.checkpoint, heads=args.heads, device=device)
    return model, layout


def set_help(p: argparse.ArgumentParser, text: str, *dests):
    """The --help text of the options ``dests`` of the shared groups, for this command."""
    for action in p._actions:
        if action.dest in dests:
            action.help = text


def hide(p: argparse.ArgumentParser, *dests):
    """Options of the shared groups that a command does not use: accepted, not shown in --help."""
    set_help(p, argparse.SUPPRESS, *dests)


def say(*a):
    common.eprint(*a)
