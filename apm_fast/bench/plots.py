"""PNG plots drawn from the benchmark's JSON files (matplotlib, no display needed).

    python -m apm_fast.bench.plots benchmarks/results/<machine>/     (or: apm-fast bench-plot DIR)

* ``scaling*.png``: time and peak memory against the number of location queries, APM beside CLIP;
* ``ttt_step*.png``: one TTT step's latency per implementation (median, p20-p80 whiskers);
* ``forward*.png``: forward time per image, every backend and batch;
* ``table4*.png``: the Table 4 re-measurement as a table, and FLOPs against TTT steps t;
* ``ab*.png``: one engine setting's values in turns, ms a step per turn (one panel per table and S).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List

from .flops import FLOPS_CONVENTION

__all__ = ["plot_dir", "plot_file", "add_parser", "run", "main"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(r):
    return r.get("status") == "ok" and "timing" in r


def _subtitle(doc) -> str:
    line = doc.get("machine_line", "")
    if doc.get("quick"):
        line += " | quick (shrunk sizes)"
    if doc.get("speedups_suppressed"):
        line += " | GATE FAILED"
    return line


def _wrap(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _save(plt, fig, doc, path, *, layout: bool = True):
    """The run's machine line as the figure's title (unless the caller placed it), then the PNG."""
    if layout:
        fig.suptitle(_wrap(_subtitle(doc)), fontsize=8)
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(doc, path: Path):
    plt = _plt()
    rows = doc.get("rows", [])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for model, color, marker in (("apm", "tab:blue", "o"), ("clip", "tab:red", "s")):
        rs = [r for r in rows if r["model"] == model]
        if not rs:
            continue
        ok = [r for r in rs if _ok(r)]
        modes = list(dict.fromkeys(r["timing_mode"] for r in ok if r.get("timing_mode")))
        label = rs[0]["label"] + (f"; timed {' / '.join(modes)}" if modes else "")
        q = [r["queries"] for r in ok]
        med = [r["timing"]["median_ms"] for r in ok]
        lo = [r["timing"]["median_ms"] - r["timing"]["p20_ms"] for r in ok]
        hi = [r["timing"]["p80_ms"] - r["timing"]["median_ms"] for r in ok]
        if ok:
            ax_t.errorbar(q, med, yerr=[lo, hi], color=color, marker=marker, label=label, capsize=3)
            mem = [(r["queries"], r["peak_bytes"] / 2**20) for r in ok if r.get("peak_bytes") is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], color=color, marker=marker, label=label)
        for r in rs:
            if not _ok(r):
                ax_t.axvline(r["queries"], color=color, ls=":", lw=1)
                ax_t.annotate(r["status"], (r["queries"], 0.02), xycoords=("data", "axes fraction"),
                              color=color, rotation=90, fontsize=7, ha="right", va="bottom")
    grids = sorted({(r["queries"], r["grid"]) for r in rows})
    has_mem = any(r.get("peak_bytes") is not None for r in rows)
    for ax, ylabel in ((ax_t, "forward time per image (ms)"), (ax_m, "peak memory (MiB = 2^20 B, weights included)")):
        ax.set_xscale("log")
        if ax is ax_t or has_mem:
            ax.set_yscale("log")
        ax.set_xticks([q for q, _ in grids])
        ax.set_xticklabels([f"{q}\n({g}x{g})" for q, g in grids], fontsize=7)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("location queries / patch tokens L (grid)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_m.set_xlim(ax_t.get_xlim())
    if not has_mem:
        ax_m.set_yticks([])
        ax_m.text(0.5, 0.5, "peak memory is measured on CUDA devices only", ha="center",
                  va="center", transform=ax_m.transAxes, fontsize=9)
    ax_t.set_title("time vs number of queries")
    ax_m.set_title("peak memory vs number of queries")
    _save(plt, fig, doc, path)


def plot_step(doc, path: Path):
    plt = _plt()
    rows = doc.get("rows", [])
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(len(presets) or 1, 1, figsize=(11, 0.42 * max(8, len(rows)) + 1.2),
                             squeeze=False)
    colors = {"authors": "tab:gray", "eager": "tab:orange", "compile": "tab:olive"}
    all_ok = [r["timing"]["median_ms"] for r in rows if _ok(r)]
    xmin = min(all_ok) / 3 if all_ok else 1e-3
    xmax = max(all_ok) * 8 if all_ok else 1.0
    for ax, preset in zip(axes[:, 0], presets):
        rs = [r for r in rows if r["preset"] == preset]
        labels = [r["label"] for r in rs]
        for i, r in enumerate(rs):
            if _ok(r):
                t = r["timing"]
                ax.barh(i, t["median_ms"], color=colors.get(r["key"], "tab:blue"),
                        xerr=[[t["median_ms"] - t["p20_ms"]], [t["p80_ms"] - t["median_ms"]]], capsize=3)
                note = f" {t['median_ms']:.3g} ms"
                if r.get("speedup_vs_eager") is not None:
                    note += f"  ({r['speedup_vs_eager']:.1f}x vs eager)"
                if r.get("gate") == "failed":
                    note += "  GATE FAILED"
                ax.text(t["p80_ms"] * 1.1, i, note, va="center", fontsize=8)
            else:
                ax.text(xmin * 1.2, i, f"{r['status']}: {r.get('reason', '')}"[:95], va="center",
                        fontsize=7, color="dimgray", style="italic")
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(len(rs) - 0.4, -0.6)
        ax.set_xscale("log")
        ax.set_xlim(xmin, xmax)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.set_title(f"one TTT step at B = 1, {preset}", fontsize=10)
    axes[-1, 0].set_xlabel("milliseconds per step (median, whiskers p20-p80)")
    _save(plt, fig, doc, path)


def plot_forward(doc, path: Path):
    plt = _plt()
    rows = [r for r in doc.get("rows", []) if _ok(r)]
    if not rows:
        return False
    keys = list(dict.fromkeys((r["preset"], r["batch"], r["mode"]) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(keys) * len(backends)), 4.8))
    width = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, k in enumerate(keys):
            r = next((r for r in rows if (r["preset"], r["batch"], r["mode"]) == k and r["backend"] == b), None)
            if r is not None:
                xs.append(i + j * width)
                ys.append(r["ms_per_image"])
        ax.bar(xs, ys, width=width, label=b)
    ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{p}\nB={b} {m}" for p, b, m in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (median)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("forward per image")
    _save(plt, fig, doc, path)
    return True


def plot_table4(doc, path: Path):
    from .report import table4_rows

    plt = _plt()
    t_max = doc.get("t_max", 20)
    lines = table4_rows(doc)
    cols = ["model", "role", "params", "peak memory", "FLOPs t=1", f"FLOPs t={t_max}",
            f"t={t_max} measured"]
    cells = [[d["model"], d["role"], d["params"], d["peak"], d["flops_1"], d["flops_t"],
              d["measured_t"]] for d in lines] or [["(no rows)"] + [""] * 6]
    # layout in inches, bottom to top: x label, chart, gap, table, table title, machine line
    table_h = 0.3 * (len(cells) + 1)
    chart_h = 3.4
    height = 0.6 + chart_h + 0.8 + table_h + 0.45 + 0.45
    fig = plt.figure(figsize=(15, height))
    ax_tab = fig.add_axes([0.01, (0.6 + chart_h + 0.8) / height, 0.98, table_h / height])
    ax_tab.axis("off")
    table = ax_tab.table(cellText=cells, colLabels=cols, cellLoc="left", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(cols))))
    ax_tab.set_title("Table 4 re-measured (student and teacher apart; FLOPs analytic unless "
                     f"marked, {FLOPS_CONVENTION}; student: plain / rewritten)", fontsize=10)
    ax = fig.add_axes([0.07, 0.6 / height, 0.6, chart_h / height])
    ts = list(range(1, t_max + 1))
    for r in doc.get("rows", []):
        if r.get("status") != "ok":
            continue
        fl = r["flops"]
        if r["role"] == "student":
            ax.plot(ts, fl["rewritten"]["analytic"]["by_t"], label=f"{r['name']} (rewritten)")
            ax.plot(ts, fl["plain"]["analytic"]["by_t"], ls="--", label=f"{r['name']} (plain)")
        elif r["role"] == "teacher":
            ax.plot(ts, fl["analytic"]["by_t"], ls=":", label=r["name"] + " (once per image)")
        else:
            ax.plot(ts, fl["analytic"]["by_t"], lw=2, label=r["name"])
    ax.set_yscale("log")
    ax.set_xlabel("TTT steps t")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"FLOPs per image ({FLOPS_CONVENTION})", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(_wrap(_subtitle(doc), 160), fontsize=8, y=1 - 0.1 / height, va="top")
    _save(plt, fig, doc, path, layout=False)


def plot_ab(doc, path: Path):
    """ms a step of each value, turn by turn, one panel per (table, S): the values' lines apart
    by more than each line's own spread is a difference."""
    rows = [r for r in doc.get("rows", []) if _ok(r) and "turn" in r]
    panels = list(dict.fromkeys((r["backend"], r["students"]) for r in rows))
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (table, s) in zip(axes[0], panels):
        mine = [r for r in rows if r["backend"] == table and r["students"] == s]
        for value in dict.fromkeys(r["value"] for r in mine):
            pts = sorted((r["turn"], r["ms_per_step"]) for r in mine if r["value"] == value)
            ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o", label=f"{mine[0]['setting']}={value}")
        ax.set_title(f"{table}, S = {s}", fontsize=9)
        ax.set_xlabel("turn")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("ms a step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, doc, path)


_PLOTTERS = {"scaling": plot_scaling, "ttt_step": plot_step, "forward": plot_forward,
             "table4": plot_table4, "ab": plot_ab}


def _is_targets(doc) -> bool:
    """The run's ``targets.json`` (``apm_fast.bench.targets.collect``): written beside the
    results, a document of its own without a plot."""
    return isinstance(doc, dict) and {"met", "missing", "gate_passed"} <= doc.keys()


def _load(json_path: Path):
    """The results document in ``json_path`` (a JSON object with a ``suite``, or the run's
    targets), or ValueError saying what the file holds instead."""
    try:
        doc = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_path}: not a results JSON file ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{json_path}: not a results JSON file (a {type(doc).__name__}, not an object)")
    if "suite" not in doc and not _is_targets(doc):
        raise ValueError(f"{json_path}: not a results JSON file (an object without a \"suite\" key)")
    return doc


def plot_file(json_path: Path, out_dir: Path | None = None):
    """The PNG for one result file (None for files without a plot, e.g. the gate's); ValueError
    for a file that is not a results document, or whose rows lack what its plot draws."""
    json_path = Path(json_path)
    doc = _load(json_path)
    fn = _PLOTTERS.get(doc.get("suite"))
    if fn is None:
        return None
    out = Path(out_dir or json_path.parent) / (json_path.stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        drawn = fn(doc, out)
    except (KeyError, IndexError, TypeError, ValueError) as exc:       # rows without the fields drawn
        _plt().close("all")
        raise ValueError(f"{json_path}: a {doc['suite']!r} results file the plot cannot read "
                         f"({type(exc).__name__}: {exc})") from exc
    return None if drawn is False else out


def plot_dir(directory, out_dir=None, *, warn: Callable[[str], None] | None = None) -> List[Path]:
    """Every plot for the result files in ``directory`` (searched recursively), or for the one
    results file ``directory`` names. In a folder, a JSON file that is not a results document
    (another tool's output, a list, a torn write) or that its plot cannot read is skipped with one
    line to ``warn`` (default: stderr) and the others are drawn; FileNotFoundError where the folder holds no results
    document, ValueError where the one file named is not one."""
    directory = Path(directory)
    if warn is None:
        warn = lambda line: print(f"bench-plot: {line}", file=sys.stderr)
    if not directory.exists():
        raise FileNotFoundError(f"results directory: {directory} does not exist")
    if directory.is_file():
        try:
            p = plot_file(directory, out_dir)
        except ValueError as exc:
            raise ValueError(f"results directory: expected a folder or one results JSON file, got {exc}") from exc
        return [] if p is None else [p]
    made, found, skipped = [], 0, 0
    for f in sorted(directory.rglob("*.json")):
        target = None if out_dir is None else Path(out_dir) / f.parent.relative_to(directory)
        try:
            p = plot_file(f, target)
        except ValueError as exc:
            warn(f"skipped {exc}")
            skipped += 1
            continue
        found += 1
        if p is not None:
            made.append(p)
    if not found:
        raise FileNotFoundError(f"results directory: expected results JSON files under {directory}, found none"
                                + (f" ({skipped} other JSON files skipped)" if skipped else ""))
    return made


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("directory", help="a results folder (e.g. benchmarks/results/<machine>/, searched "
                                     "recursively) or one results JSON file")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: beside the JSON)")


def add_parser(subparsers):
    """``apm-fast bench-plot DIR``: add the subcommand and return its parser."""
    p = subparsers.add_parser("bench-plot", help="draw PNG plots from benchmark JSON files",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    skipped = []

    def warn(line):
        skipped.append(line)
        print(f"bench-plot: {line}", file=sys.stderr)

    try:
        made = plot_dir(args.directory, args.out, warn=warn)
    except (FileNotFoundError, ValueError) as exc:
        print(f"bench-plot: {exc}", file=sys.stderr)
        return 2
    for p in made:
        print(p)
    print(f"bench-plot: {len(made)} plots written; {len(skipped)} JSON files skipped (named above)",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apm_fast.bench.plots", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
