"""The ``apm-fast`` command line: ``apm-fast {ttt,demo,info,...} ...``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (returns its
``argparse`` parser) and ``run(args) -> int`` (the exit code). Adding one is one module plus one
line in :data:`SUBCOMMANDS` (or a call to :func:`register_subcommand`). A subcommand whose module
fails to import (a missing optional dependency) still appears and reports why when used.

Exit codes: 0 success; 1 some inputs failed (reported, the rest done); 2 bad arguments or set-up.
Set ``APM_FAST_DEBUG=1`` to get the full traceback instead of the one-line error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Dict, List, Optional

__all__ = ["SUBCOMMANDS", "register_subcommand", "build_parser", "main", "CLIError"]

# name -> module with add_parser(subparsers) and run(args)
SUBCOMMANDS: Dict[str, str] = {
    "ttt": "apm_fast.commands.ttt",
    "eval": "apm_fast.commands.eval",
    "demo": "apm_fast.commands.demo",
    "info": "apm_fast.commands.info",
    "bench": "apm_fast.bench.cli",
    "bench-plot": "apm_fast.bench.plots",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def register_subcommand(name: str, module: str):
    """Add a subcommand implemented by ``module`` (``add_parser(subparsers)``, ``run(args)``)."""
    SUBCOMMANDS[name] = module


def _broken(name: str, exc: Exception):
    def add_parser(subparsers):
        return subparsers.add_parser(name, help=f"(unavailable: {exc})")

    def run(args):
        raise CLIError(f"this subcommand cannot run here: {type(exc).__name__}: {exc}")

    return add_parser, run


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="apm-fast", description="Asynchronous Perception Machine: test-time training and tools.")
    parser.add_argument("--version", action="version", version=f"apm-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, modname in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(modname)
            add_parser, run = mod.add_parser, mod.run
        except Exception as exc:  # keep the other subcommands usable
            add_parser, run = _broken(name, exc)
        sub = add_parser(subparsers)
        sub.set_defaults(_run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"apm-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        if os.environ.get("APM_FAST_DEBUG"):
            raise
        print(f"apm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
