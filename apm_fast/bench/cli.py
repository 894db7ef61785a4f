"""The ``apm-fast bench`` subcommand (also ``python -m apm_fast.bench``).

Follows the package CLI's contract: ``add_parser(subparsers)`` returns the parser, ``run(args)``
the exit status (0; 1 when the correctness gate failed; 2 for bad options). ``apm-fast
bench-plot`` lives in :mod:`apm_fast.bench.plots` with the same contract.
"""
from __future__ import annotations

import argparse
import os
import sys

from .options import OPTIONAL_SECTIONS, SECTIONS

__all__ = ["add_parser", "build_options", "run", "main"]


def _add_bench_arguments(p: argparse.ArgumentParser):
    from ..commands.common import non_negative_int, positive_float, positive_int, preset_name
    from ..config import PRESETS

    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=None,
                   help="presets to measure (default: all)")
    p.add_argument("--only", nargs="+", choices=SECTIONS + OPTIONAL_SECTIONS, default=None,
                   help="sections to run (default: all but ab; the correctness gate always runs)")
    p.add_argument("--skip", nargs="+", default=(), metavar="KEY",
                   help="implementations, backends or row keys to leave out, exactly or by shell-style "
                        "pattern, e.g. compile authors triton 'latency/*/eager' (listed as skipped)")
    p.add_argument("--out", default="bench-results",
                   help="results root; files go to OUT/<gpu-or-cpu-name>/ (default: %(default)s; the "
                        "committed results live under benchmarks/results/<machine>/)")
    p.add_argument("--no-out", action="store_true", help="print only, write no files")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shrunk sizes (the default on the CPU)")
    size.add_argument("--full", action="store_true", help="full sizes even on the CPU (slow)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats, >= 20 (default: %(default)s)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls first (default: %(default)s)")
    p.add_argument("--authors-presets", nargs="*", type=preset_name, default=None, metavar="PRESET",
                   help="presets at which the (slow) authors-style step runs (default: all)")
    p.add_argument("--compile-presets", nargs="*", type=preset_name, default=None, metavar="PRESET",
                   help="presets at which torch.compile runs (default: all on the GPU, "
                        "ttt-l14 in quick mode)")
    p.add_argument("--engine-presets", nargs="*", type=preset_name, default=None, metavar="PRESET",
                   help="TTT presets at which the engine section times each table's plain step at one "
                        "image, beside the engine preset's rows (default: every TTT preset of --preset)")
    p.add_argument("--scaling-grids", nargs="+", type=positive_int, default=None, metavar="G",
                   help="query grid sides for the scaling sweep")
    p.add_argument("--students-list", nargs="+", type=positive_int, default=None, metavar="S",
                   help="students side by side in the throughput section (default: 1 8 32 64)")
    p.add_argument("--e2e-images", type=non_negative_int, default=None, metavar="N",
                   help="images of the end-to-end run (default: 512; 0: not run)")
    p.add_argument("--eval-images", type=positive_int, default=None, metavar="N",
                   help="images per teacher in the evaluation section (default: 128)")
    p.add_argument("--tpt-towers", nargs="*", default=None, metavar="MODEL",
                   help="open_clip towers for the TPT rows of Table 4 (default: ViT-B-16)")
    p.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="soft limit: once spent, what has not started is recorded as skipped")
    p.add_argument("--ab", default=None, metavar="SETTING=V1,V2",
                   help="measure one engine setting's values in turns, on every kernel table and every S of "
                        "--students-list, e.g. overlap=true,false (none: the table's default); runs the ab "
                        "section (alone unless --only names others)")
    p.add_argument("--ab-turns", type=positive_int, default=2, metavar="N",
                   help="turns of the --ab values (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNGs")
    p.add_argument("--commit", default=None, help="commit to record where the tree has no .git")


def build_options(args):
    """BenchOptions from parsed arguments."""
    from ..commands.common import pick_device
    from .options import BenchOptions

    device = str(pick_device(args.device))          # a bad or absent device: a CLIError, exit 2
    quick = args.quick or (device == "cpu" and not args.full)
    kw = dict(device=device, repeats=args.repeats, warmup=args.warmup, skip=tuple(args.skip),
              out=None if args.no_out else args.out, plots=not args.no_plots,
              time_budget_s=args.time_budget)
    if args.preset:
        kw["presets"] = tuple(args.preset)
    if args.only:
        kw["sections"] = tuple(args.only)
    if args.ab is not None:
        from .sections.ab import parse_values

        kw["ab"] = parse_values(args.ab)
        kw["ab_turns"] = args.ab_turns
        kw["sections"] = tuple(dict.fromkeys(kw.get("sections", ()) + ("ab",)))
    if args.authors_presets is not None:
        kw["authors_presets"] = tuple(args.authors_presets)
    if args.compile_presets is not None:
        kw["compile_presets"] = tuple(args.compile_presets)
    if args.engine_presets is not None:
        kw["engine_presets"] = tuple(args.engine_presets)
    if args.scaling_grids:
        kw["scaling_grids"] = tuple(args.scaling_grids)
    if args.tpt_towers is not None:
        from .clip_models import check_tower_names

        check_tower_names(args.tpt_towers, "--tpt-towers")     # not a section's error row later
        kw["tpt_towers"] = tuple(args.tpt_towers)
    if args.students_list:
        kw["students_list"] = tuple(args.students_list)
    if args.e2e_images is not None:
        kw["e2e_images"] = args.e2e_images
    if args.eval_images is not None:
        kw["eval_images"] = args.eval_images
    return BenchOptions.quick_defaults(**kw) if quick else BenchOptions(**kw)


def run(args) -> int:
    """Run the benchmark; exit status 0, or 1 when the correctness gate failed."""
    from .suite import run_suite

    if getattr(args, "commit", None):
        os.environ["APM_FAST_COMMIT"] = args.commit
    from ..cli import CLIError

    try:
        options = build_options(args)
    except (ValueError, CLIError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    result = run_suite(options)
    from .report import summary_lines

    print("\n== summary")
    for line in summary_lines(result):
        print(line)
    return 0 if result.gate_passed else 1


def add_parser(subparsers):
    """Add ``bench`` to an ``argparse`` subparsers object and return its parser."""
    p = subparsers.add_parser("bench", help="benchmark suite (gate, timings, FLOPs, memory)",
                              description="Correctness gate, then TTT step / throughput / forward / "
                                          "scaling / Table 4, with tables, JSON and plots.")
    _add_bench_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    from . import plots

    parser = argparse.ArgumentParser(prog="python -m apm_fast.bench")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    plots.add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("bench", "bench-plot", "-h", "--help"):
        argv = ["bench"] + argv          # `python -m apm_fast.bench --quick` means `bench --quick`
    args = parser.parse_args(argv)
    return args.func(args)
