"""The ``apm-fast`` command line: ``apm-fast {ttt,demo,info,...} ...``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (returns its
``argparse`` parser) and ``run(args) -> int`` (the exit code). Adding one is one module plus one
line in :data:`SUBCOMMANDS` (or a call to :func:`register_subcommand`). A subcommand whose module
fails to import (a missing optional dependency) still appears and reports why when used.

Exit codes (scripts may rely on them):

- 0 success;
- 1 some images skipped (unreadable, or their training diverged: each reported on stderr; the
  others were done), and nothing else;
- 2 bad arguments or set-up (argparse's own errors too), and I/O failures (a full disk, a file
  that cannot be read or written, permissions): one line ``apm-fast CMD: error: ...``;
- 3 an unexpected exception (a bug, or a failure the package did not foresee): one line naming
  the exception;
- 130 interrupted (Ctrl-C); 141 the output pipe was closed by its reader (``apm-fast ... | head``):
  exits quietly, as a program stopped by SIGPIPE (128 + 13).

Set ``APM_FAST_DEBUG=1`` to get the full traceback instead of the one-line error (codes 2 and 3).
Warnings of the package itself (e.g. entries of a searched folder that are skipped) are printed
as one line ``apm-fast CMD: warning: ...``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional

__all__ = ["SUBCOMMANDS", "register_subcommand", "build_parser", "main", "run_command", "CLIError",
           "EXIT_OK", "EXIT_SKIPPED", "EXIT_ERROR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE"]

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141

# name -> module with add_parser(subparsers) and run(args)
SUBCOMMANDS: Dict[str, str] = {
    "ttt": "apm_fast.commands.ttt",
    "eval": "apm_fast.commands.eval",
    "distill": "apm_fast.commands.distill",
    "islands": "apm_fast.commands.islands",
    "decode": "apm_fast.commands.decode",
    "interpolate": "apm_fast.commands.interpolate",
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


def _debug() -> bool:
    return os.environ.get("APM_FAST_DEBUG", "") not in ("", "0")


def _os_error_text(exc: OSError) -> str:
    """``No space left on device: 'out.jsonl'``: what failed, and on which file when known."""
    what = exc.strerror or str(exc) or type(exc).__name__
    files = [f for f in (exc.filename, getattr(exc, "filename2", None)) if f is not None]
    return f"I/O error: {what}" + (": " + " -> ".join(repr(os.fsdecode(f)) for f in files) if files else "")


def _one_line(text, limit: Optional[int] = None) -> str:
    """The message on one line (an error is one line on stderr), cut at ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[:limit - 3] + "..."


def _silence_stdout():
    """After a broken pipe: point stdout at /dev/null, so that the interpreter's final flush of
    what is still buffered does not fail a second time (and print a traceback at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # stdout without a file descriptor (captured)
        pass


def _print_package_warnings(prog: str):
    """Inside ``warnings.catch_warnings()``: the package's own warnings become one line each."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "apm_fast":
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; the exit code (see the module's docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(f"apm-fast {args.command}", lambda: args._run(args))


def run_command(prog: str, run: Callable[[], Optional[int]]) -> int:
    """``run()`` as the command ``prog``: its exit code, and the exit codes and one-line errors
    and warnings of the module's docstring for what it raises (also used by other entry points
    of the package, e.g. ``python -m apm_fast.distributed``)."""
    with warnings.catch_warnings():
        _print_package_warnings(prog)
        try:
            return int(run() or 0)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:          # `apm-fast ... | head`: the reader has what it wanted
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        except CLIError as exc:
            if _debug():
                raise
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as exc:
            if _debug():
                raise
            print(f"{prog}: error: {_one_line(_os_error_text(exc))}", file=sys.stderr)
            return EXIT_ERROR
        except Exception as exc:
            if _debug():
                raise
            print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc, 300)} (run again with "
                  f"APM_FAST_DEBUG=1 to see the traceback)", file=sys.stderr)
            return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
