"""The default backend on a GPU, from measurements: which table ran the TTT step fastest, per GPU
model and preset, in the committed benchmark results.

``apm_fast/data/fastest.json`` holds, for every GPU model with a committed result, the
graph-replayed step time of every table at every preset measured there, with the commit, file and
row it came from. It is written from those files by this module and nothing else (a test checks
that it still equals what they give)::

    python -m apm_fast.backends.measured benchmarks/results/*/suite/engine.json benchmarks/results/*/suite/ttt_step.json

The rows, preferred first: the engine section's ``latency/<table>/graph`` (``engine.json``: one
image's 20 steps replayed back to back, as the TTT trainer runs them, at every TTT preset of the
run: each row's ``preset``, else the section's engine preset), then the step section's
``engine/<table>`` (``ttt_step.json``: one step at a time, its loss read after each, so launch
and host time weigh in: on the H200 at b377a5b 0.566 ms for the triton table against 0.471 back
to back, and the two tables' order differed between the two), then ``<table>+graph`` (results
from before the engine had a row per table). A GPU takes its rows from the most preferred kind
any of its files has.

:func:`choose` orders the available tables by that measurement: the preset's own row when the
model's config is a preset, else the sum over the GPU's measured presets; a GPU that was never
measured gets the fixed order :data:`FALLBACK` (the order every measurement so far agrees with).
Tables within :data:`TIE` of the fastest count as tied and the fixed order decides among them:
one step's median moves by about 1 % from run to run on one machine (e.g. the triton table's
0.543 and 0.538 ms on the H200), and a default should not flip on that.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["FALLBACK", "TIE", "record", "load", "preset_of", "choose"]

# a GPU without a measurement: the order every committed measurement agrees with
FALLBACK = ("triton", "cuda", "torch")
# relative difference below which two measured tables count as equally fast
TIE = 0.02
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fastest.json")
# (suite, key of a table's row, where its ms per step is), preferred first (see the docstring)
_ROWS = (("engine", "latency/{}/graph", "ms_per_step"), ("ttt_step", "engine/{}", "timing"),
         ("ttt_step", "{}+graph", "timing"))


def _step_ms(row: dict, field: str) -> Optional[float]:
    value = row.get(field)
    if field == "timing":
        value = value.get("median_ms") if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def record(files: Iterable[str]) -> dict:
    """The table of ``fastest.json`` from ``engine`` and ``ttt_step`` result files (one GPU model
    each; for one GPU, a file with a more preferred kind of row wins, and of two with the same
    kind the later one)."""
    gpus: Dict[str, Tuple[int, dict]] = {}
    for path in files:
        with open(path) as f:
            result = json.load(f)
        suite = result.get("suite")
        if suite not in {s for s, _, _ in _ROWS}:
            raise ValueError(f"{path}: expected an engine or ttt_step result file, got suite {suite!r}")
        machine = result.get("machine") or {}
        if machine.get("device") != "cuda":
            continue                                   # CPU timings say nothing about the GPU tables
        unfit = [why for why, bad in (("its correctness gate did not pass", result.get("gate_passed") is False),
                                      ("a --quick run (shrunk sizes)", bool(result.get("quick"))),
                                      ("a partial run", bool(result.get("partial")))) if bad]
        if unfit:
            raise ValueError(f"{path}: cannot choose the default tables from {' and '.join(unfit)}; "
                             f"give the files of a complete run whose gate passed")
        default_preset = (result.get("options") or {}).get("engine_preset")
        for rank, (kind, template, field) in enumerate(_ROWS):
            if kind != suite:
                continue
            presets: Dict[str, Dict[str, float]] = {}
            for row in result.get("rows", []):
                ms = _step_ms(row, field) if row.get("status") == "ok" else None
                preset = row.get("preset", default_preset)
                for name in FALLBACK:
                    if ms is not None and preset and row.get("key") == template.format(name):
                        presets.setdefault(preset, {})[name] = round(ms, 4)
            if presets:
                gpu = machine["gpu"]
                if gpu not in gpus or rank <= gpus[gpu][0]:
                    gpus[gpu] = (rank, {"commit": machine.get("commit"),
                                        "file": os.path.normpath(path).replace(os.sep, "/"),
                                        "row": template.format("<table>"),
                                        "step_ms": {p: presets[p] for p in sorted(presets)}})
                break
    return {"what": "median ms of one graph-replayed TTT step at one image, per table",
            "gpus": {g: gpus[g][1] for g in sorted(gpus)}}


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


def choose(gpu: Optional[str], config, available: Sequence[str]) -> Tuple[str, str]:
    """(the default table, why) among ``available`` for a GPU model name and a model config."""
    if not available:
        return "torch", "no GPU table is available here (apm-fast info says why)"
    entry = load().get("gpus", {}).get(gpu or "")
    preset = preset_of(config)
    if entry is None:
        name = next((n for n in FALLBACK if n in available), available[0])
        return name, (f"no measurement for {gpu or 'this GPU'}; the fixed order {' > '.join(FALLBACK)} "
                      f"(every measured GPU agrees with it)")
    steps = entry["step_ms"]
    src = f"{entry['file']} at {entry['commit']}"
    if preset in steps:
        times = {n: steps[preset][n] for n in available if n in steps[preset]}
        where = f"{preset} on {gpu}"
    else:
        both = [n for n in available if all(n in s for s in steps.values())]
        times = {n: sum(s[n] for s in steps.values()) for n in both}
        why = "" if config is None else ("; this model is not a preset" if preset is None
                                         else f"; {preset} has no TTT step measured there")
        where = f"{gpu}, summed over its measured presets ({', '.join(steps)}){why}"
    if not times:
        name = next((n for n in FALLBACK if n in available), available[0])
        return name, f"none of the available tables was measured on {gpu}; the fixed order"
    ranked: List[str] = sorted(times, key=times.get)
    detail = ", ".join(f"{n} {times[n]:.3f} ms" for n in ranked)
    best = times[ranked[0]]
    tied = [n for n in ranked if times[n] <= best * (1 + TIE)]
    if len(tied) > 1:
        order = list(FALLBACK) + [n for n in tied if n not in FALLBACK]
        name = min(tied, key=order.index)
        return name, (f"measured within {TIE:.0%} of each other ({', '.join(tied)}) for {where}, so the fixed "
                      f"order {' > '.join(FALLBACK)} decides (one TTT step: {detail}; {src})")
    return ranked[0], f"measured fastest for {where} (one TTT step: {detail}; {src})"


def main(argv=None) -> int:
    files = list(sys.argv[1:] if argv is None else argv)
    if not files:
        print("usage: python -m apm_fast.backends.measured RESULTS/engine.json RESULTS/ttt_step.json ...",
              file=sys.stderr)
        return 2
    table = record(files)
    with open(PATH, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {PATH}: {', '.join(table['gpus']) or 'no GPU results'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
