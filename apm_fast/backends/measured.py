"""The default backend on a GPU, from measurements: which table ran a workload fastest, per GPU
model, workload and preset, in the committed benchmark results.

Two workloads: ``ttt_step`` (one TTT step at one image: what the trainer, the engine and the
other training loops run) and ``forward`` (one image's inference forward, ``model(x)``, grid
output). ``apm_fast/data/fastest.json`` holds, per GPU model, workload and preset, every table's
time in one run, with the file, commit, start time and rows it came from, the precision it was
measured in, and the tables that run did not measure. It is written from result files by this
module and nothing else (a test checks that it still equals what the committed results give)::

    python -m apm_fast.backends.measured benchmarks/results

(files or folders; a folder is searched for the result files of the ``engine``, ``ttt_step``
and ``forward`` sections, other JSON files and the folders named ``measured-not-kept``, whose
code was not kept, left out).

The rows, preferred first: for ``ttt_step``, the engine section's ``latency/<table>/graph``
(``engine.json``: one image's 20 steps replayed back to back, as the TTT trainer runs them, at
every TTT preset of the run: each row's ``preset``, else the section's engine preset), then the
step section's ``engine/<table>`` (``ttt_step.json``: one step at a time, its loss read after
each, so launch and host time weigh in: on the H200 at b377a5b 0.566 ms for the triton table
against 0.471 back to back, and the two tables' order differed between the two), then
``<table>+graph`` (results from before the engine had a row per table); for ``forward``, the
forward section's ``<table>`` row at batch 1, grid output (``forward.json``).

Per GPU model, workload and preset, the entry is the newest run (its ``started``) that timed at
least two tables there, complete and gate-passed, at a commit (runs whose ``commit`` is not a
commit hash measured code outside the history and are left out); within that run, the most
preferred kind of row. Only the tables of that one run are ranked; the others are listed as not
measured there. A result file of a failed, quick or partial run is refused, not skipped.

:func:`choose` orders the available tables by that measurement for the model's preset; for a
preset (or a config that is no preset) not measured for the workload on that GPU, by the sum over
the workload's measured presets there (the reason says so, and which runs they came from); for a
GPU or workload never measured, by the fixed order :data:`FALLBACK` (the reason says how many of
the measured GPU/preset pairs it agrees with). Tables within :data:`TIE` of the fastest count as
tied and the fixed order decides among them: one step's median moves by about 1 % from run to run
on one machine (e.g. the triton table's 0.543 and 0.538 ms on the H200), and a default should not
flip on that.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["FALLBACK", "TIE", "WORKLOADS", "record", "load", "preset_of", "check_workload", "choose"]

# a GPU or workload without a measurement: this fixed order (how often it agrees: choose's reason)
FALLBACK = ("triton", "cuda", "torch")
# relative difference below which two measured tables count as equally fast
TIE = 0.02
# the workloads a default is chosen for, and what their timings are
WORKLOADS = {"ttt_step": "median ms of one TTT step at one image, per table",
             "forward": "median ms of one image's inference forward (batch 1, grid output), per table"}
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fastest.json")
# (workload, suite, key of a table's row, where its ms is, what else the row must hold, how the
# reason names the row), preferred first within a workload (see the docstring)
_ROWS = (("ttt_step", "engine", "latency/{}/graph", "ms_per_step", {}, "steps replayed back to back"),
         ("ttt_step", "ttt_step", "engine/{}", "timing", {}, "one step at a time"),
         ("ttt_step", "ttt_step", "{}+graph", "timing", {}, "one step at a time"),
         ("forward", "forward", "{}", "ms_per_image", {"batch": 1, "mode": "grid"}, "batch 1, grid output"))
_SUITES = {suite for _, suite, _, _, _, _ in _ROWS}
_NOT_KEPT = "measured-not-kept"
_COMMIT = re.compile(r"[0-9a-f]{7,40}")


def _ms(row: dict, field: str) -> Optional[float]:
    value = row.get(field)
    if field == "timing":
        value = value.get("median_ms") if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _result_files(paths: Iterable[str]) -> List[Tuple[str, bool]]:
    """(file, named) for every path: a file as given; a folder's JSON files, sorted, but for
    those under a ``measured-not-kept`` folder."""
    out = []
    for path in paths:
        if not os.path.isdir(path):
            out.append((path, True))
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != _NOT_KEPT)
            out += [(os.path.join(root, f), False) for f in sorted(files) if f.endswith(".json")]
    return out


def record(paths: Iterable[str], notes: Optional[List[str]] = None) -> dict:
    """The table of ``fastest.json`` from result files and folders of them (see the docstring).
    ``notes``, a list: gets one line per result file (or preset of one) left out, and why."""
    notes = [] if notes is None else notes
    best: Dict[Tuple[str, str, str], Tuple[tuple, dict]] = {}
    for path, named in _result_files(paths):
        try:
            with open(path) as f:
                result = json.load(f)
        except ValueError:
            if named:
                raise
            continue
        suite = result.get("suite") if isinstance(result, dict) else None
        if suite not in _SUITES:
            if named:
                raise ValueError(f"{path}: expected an engine, ttt_step or forward result file, got suite {suite!r}")
            continue
        machine = result.get("machine") or {}
        if machine.get("device") != "cuda":
            continue                                   # CPU timings say nothing about the GPU tables
        gate = result.get("gate_passed")
        unfit = [why for why, bad in (("its correctness gate did not pass", gate is False),
                                      ("a run with no passed correctness gate recorded", gate not in (True, False)),
                                      ("a --quick run (shrunk sizes)", bool(result.get("quick"))),
                                      ("a partial run", bool(result.get("partial")))) if bad]
        if unfit:
            raise ValueError(f"{path}: cannot choose the default tables from {' and '.join(unfit)}; "
                             f"give the files of a complete run whose gate passed")
        commit = str(machine.get("commit") or "")
        if not _COMMIT.fullmatch(commit):
            notes.append(f"{path}: left out: its commit {commit!r} is not a commit hash (code outside the history)")
            continue
        default_preset = (result.get("options") or {}).get("engine_preset")
        for workload, kind, template, field, where, label in _ROWS:
            if kind != suite:
                continue
            rank = [r[2] for r in _ROWS if r[0] == workload].index(template)   # 0: the most preferred
            times: Dict[str, Dict[str, float]] = {}
            missing: Dict[str, Dict[str, str]] = {}
            for row in result.get("rows", []):
                preset = row.get("preset", default_preset)
                if not preset or any(row.get(k) != v for k, v in where.items()):
                    continue
                for name in FALLBACK:
                    if row.get("key") != template.format(name):
                        continue
                    ms = _ms(row, field) if row.get("status") == "ok" else None
                    if ms is not None:
                        times.setdefault(preset, {})[name] = round(ms, 4)
                    else:
                        missing.setdefault(preset, {})[name] = (f"{row.get('status') or 'no time'}"
                                                                f"{': ' + row['reason'] if row.get('reason') else ''}")
            for preset, ms in times.items():
                if len(ms) < 2:
                    continue                           # one table alone ranks nothing
                rows = [r for r in result.get("rows", []) if r.get("preset", default_preset) == preset
                        and r.get("key") in {template.format(n) for n in ms}
                        and all(r.get(k) == v for k, v in where.items())]
                precisions = sorted({r.get("precision") for r in rows if r.get("precision")})
                entry = {"commit": commit, "started": result.get("started"),
                         "file": os.path.normpath(path).replace(os.sep, "/"),
                         "row": template.format("<table>") + (f" ({label})" if label else ""),
                         "precision": " / ".join(precisions) or machine.get("dtype") or "not recorded",
                         "ms": {n: ms[n] for n in FALLBACK if n in ms},
                         "not_measured": {n: missing.get(preset, {}).get(n, "no row")
                                          for n in FALLBACK if n not in ms}}
                if workload == "forward" and not all("eager_ms_per_image" in r for r in rows):
                    # the forward section times model(x)'s replayed graph with the eager launch
                    # beside it; rows without the eager time are of a forward launched op by op,
                    # which model(x) on a GPU no longer runs from its second call on
                    notes.append(f"{path}: {preset}/forward left out: launched op by op, not the "
                                 f"replayed graph model(x) runs")
                    continue
                order = (str(result.get("started") or ""), -rank)
                key = (machine["gpu"], workload, preset)
                if key not in best or order > best[key][0]:
                    best[key] = (order, entry)
    gpus: Dict[str, dict] = {}
    for (gpu, workload, preset), (_, entry) in sorted(best.items()):
        gpus.setdefault(gpu, {}).setdefault(workload, {})[preset] = entry
    return {"what": dict(WORKLOADS), "gpus": gpus}


_LOADED: Optional[dict] = None


def load() -> dict:
    """The packaged table (empty when the file is missing or unreadable: the fallback order holds)."""
    global _LOADED
    if _LOADED is None:
        try:
            with open(PATH) as f:
                _LOADED = json.load(f)
        except (OSError, ValueError):
            _LOADED = {"gpus": {}}
    return _LOADED


def preset_of(config) -> Optional[str]:
    """The preset whose shapes ``config`` has (the init aside: it does not change the time), or None."""
    if config is None:
        return None
    from ..config import PRESETS

    shape = ("grid", "patch", "hidden", "dim", "heads", "pool", "rgb_head", "in_chans")
    return next((name for name, cfg in PRESETS.items()
                 if all(getattr(cfg, k) == getattr(config, k, None) for k in shape)), None)


def _fixed(available: Sequence[str]) -> str:
    return next((n for n in FALLBACK if n in available), available[0])


def _pick(times: Dict[str, float]) -> Tuple[str, List[str], List[str]]:
    """(the table a measurement picks, the tables tied with the fastest, all ranked fastest first)."""
    ranked = sorted(times, key=times.get)
    tied = [n for n in ranked if times[n] <= times[ranked[0]] * (1 + TIE)]
    order = list(FALLBACK) + [n for n in tied if n not in FALLBACK]
    return min(tied, key=order.index), tied, ranked


def _fallback_agreement(workload: str) -> str:
    """How often the fixed order's first choice is what the packaged measurements of ``workload``
    pick (computed, not assumed)."""
    pairs = [(gpu, p, e) for gpu, w in load().get("gpus", {}).items()
             for p, e in w.get(workload, {}).items() if e.get("ms")]
    if not pairs:
        return f"no {workload} measurement to check it against"
    agree = [f"{p} on {gpu}" for gpu, p, e in pairs if _pick(e["ms"])[0] == _fixed(list(e["ms"]))]
    return (f"its first choice is what the measurement picks at {len(agree)} of the {len(pairs)} "
            f"GPU/preset pairs measured for {workload}")


def check_workload(workload) -> str:
    """``workload`` if it is one of :data:`WORKLOADS`, else a ValueError naming them."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload: expected one of {list(WORKLOADS)}, got {workload!r}")
    return workload


def choose(gpu: Optional[str], config, available: Sequence[str], workload: str = "ttt_step") -> Tuple[str, str]:
    """(the default table, why) among ``available`` for a GPU model name, a model config and a
    workload (``"ttt_step"``: training; ``"forward"``: inference)."""
    check_workload(workload)
    if not available:
        return "torch", "no GPU table is available here (apm-fast info says why)"
    fixed = f"the fixed order {' > '.join(FALLBACK)} ({_fallback_agreement(workload)})"
    measured = load().get("gpus", {}).get(gpu or "")
    if measured is None:
        return _fixed(available), f"no measurement for {gpu or 'this GPU'}; {fixed}"
    entries = measured.get(workload, {})
    preset = preset_of(config)
    if preset in entries:
        e = entries[preset]
        times = {n: e["ms"][n] for n in available if n in e["ms"]}
        where = f"{preset}/{workload} on {gpu}"
        gaps = [f"{n} not measured in that run ({why})" for n, why in e.get("not_measured", {}).items()]
        src = f"{e['file']} at {e['commit']}"
        notes = [e["row"], *gaps, f"measured in {e['precision']}"]
        prefix = ""
    else:
        what = (preset if preset else "this model (not a preset)" if config is not None
                else "an unspecified model")
        prefix = f"not measured for {what}/{workload} on {gpu}; "
        if not entries:
            return _fixed(available), f"{prefix}instead {fixed}"
        both = [n for n in available if all(n in e["ms"] for e in entries.values())]
        times = {n: round(sum(e["ms"][n] for e in entries.values()), 4) for n in both}
        runs: Dict[str, List[str]] = {}
        for p, e in entries.items():
            runs.setdefault(f"{e['file']} at {e['commit']}", []).append(p)
        src = "; ".join(f"{', '.join(ps)}: {f}" for f, ps in runs.items())
        where = f"the sum over the presets measured for {workload} on {gpu} ({', '.join(entries)})"
        notes = [f"tables measured at every one of them: {', '.join(both) or 'none'}",
                 f"measured in {' / '.join(sorted({e['precision'] for e in entries.values()}))}"]
        if len(runs) > 1:
            notes.append(f"{len(runs)} runs summed")
    if not times:
        return _fixed(available), (f"{prefix}none of the available tables ({', '.join(available)}) was measured "
                                   f"for {where}; {fixed}")
    name, tied, ranked = _pick(times)
    detail = "; ".join([", ".join(f"{n} {times[n]:.3f} ms" for n in ranked), *notes, src])
    decides = f"the fixed order {' > '.join(FALLBACK)} decides"
    if prefix:
        among = (f"{', '.join(tied)} within {TIE:.0%} of each other, so {decides}" if len(tied) > 1
                 else f"{name} the fastest")
        return name, f"{prefix}instead {where}: {among} ({workload}: {detail})"
    if len(tied) > 1:
        return name, (f"measured within {TIE:.0%} of each other ({', '.join(tied)}) for {where}, so {decides} "
                      f"({workload}: {detail})")
    return name, f"measured fastest for {where} ({workload}: {detail})"


def main(argv=None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m apm_fast.backends.measured RESULTS_FOLDER_OR_FILE ...  (e.g. benchmarks/results)",
              file=sys.stderr)
        return 2
    notes: List[str] = []
    table = record(paths, notes)
    with open(PATH, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for line in notes:
        print(line)
    for gpu, workloads in table["gpus"].items():
        for workload, presets in workloads.items():
            for p, e in presets.items():
                print(f"{gpu} {workload} {p}: {', '.join(f'{n} {ms}' for n, ms in e['ms'].items())} "
                      f"({e['file']} at {e['commit']})")
    print(f"wrote {PATH}: {', '.join(table['gpus']) or 'no GPU results'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
