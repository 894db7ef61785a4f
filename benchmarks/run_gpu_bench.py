#!/usr/bin/env python
"""The whole benchmark suite on a GPU, for every preset, in one call:

    python benchmarks/run_gpu_bench.py --out "$OUT" [--commit SHA]

Writes the JSON files and the PNG plots to OUT/<gpu-name>/ and ends with a compact summary.
Sized to finish in a few minutes on an H100: the slow authors-style step (~0.4 s a step) and
torch.compile (tens of seconds of compilation per shape) run at ttt-l14 only unless asked
(--authors-presets / --compile-presets). A section that fails is recorded in its JSON and the
rest still runs. The exit status is 1 when the correctness gate failed (results are still written).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

# An installed package (pip install -e ., which also maps kernels/ to apm_fast.kernels) is used as
# is; a plain checkout that was never installed is found from here.
if importlib.util.find_spec("apm_fast") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (results go to OUT/<gpu-name>/)")
    p.add_argument("--device", default="cuda", help="default: cuda (cpu: a dry run at quick sizes)")
    p.add_argument("--presets", nargs="+", default=None, help="default: all presets")
    p.add_argument("--authors-presets", nargs="*", default=["ttt-l14"])
    p.add_argument("--compile-presets", nargs="*", default=["ttt-l14"])
    p.add_argument("--only", nargs="+", default=None, help="sections (default: all)")
    p.add_argument("--skip", nargs="+", default=(), help="implementation keys or backends to leave out")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scaling-grids", nargs="+", type=int, default=None)
    p.add_argument("--tpt-towers", nargs="*", default=None, help="default: ViT-B-16")
    p.add_argument("--time-budget", type=float, default=330,
                   help="soft limit in seconds (default %(default)s): what has not started by then is "
                        "recorded as skipped, so the run ends within a 420 s device timeout")
    p.add_argument("--quick", action="store_true", help="shrunk sizes (a smoke run)")
    p.add_argument("--commit", default=None, help="the commit measured (the copied tree has no .git)")
    return p.parse_args(argv)


def _summary(result) -> list:
    """A few lines with the numbers that matter, beside the spec's H100 numbers."""
    from apm_fast.bench import spec_numbers
    from apm_fast.bench.report import fmt_bytes

    lines = [f"gate: {'PASSED' if result.gate_passed else 'FAILED'}"]
    s = result.sections
    steps = s.get("ttt_step", {}).get("rows", [])
    for preset in dict.fromkeys(r["preset"] for r in steps):
        parts = []
        for r in steps:
            if r["preset"] != preset:
                continue
            if r.get("status") == "ok":
                x = r.get("speedup_vs_eager")
                parts.append(f"{r['key']} {r['timing']['median_ms']:.3f} ms"
                             + (f" ({x:.1f}x)" if x else "") + f" {fmt_bytes(r.get('peak_bytes'))}")
            elif r.get("status") == "error":
                parts.append(f"{r['key']} ERROR")
        lines.append(f"step {preset}: " + "; ".join(parts))
    lines.append("spec H100 ttt-l14: " + ", ".join(f"{k} {v} ms" for k, v in spec_numbers.H100_TTT_STEP_MS.items()))
    for r in s.get("throughput", {}).get("rows", []):
        if r.get("status") == "ok" and "images_per_s" in r:
            lines.append(f"throughput {r['preset']} {r['key']}: {r['images_per_s']:.1f} images/s")
    fwd = [r for r in s.get("forward", {}).get("rows", []) if r.get("status") == "ok" and "timing" in r]
    for key in dict.fromkeys((r["preset"], r["batch"], r["mode"]) for r in fwd):
        if key[2] == "grid" and any(r["mode"] == "pooled" for r in fwd if r["preset"] == key[0]):
            continue
        cells = [f"{r['backend']} {r['ms_per_image']:.4f} ms ({r['tflops']:.0f} TF/s)"
                 for r in fwd if (r["preset"], r["batch"], r["mode"]) == key]
        lines.append(f"forward {key[0]} B={key[1]} {key[2]} per image: " + ", ".join(cells))
    sc = [r for r in s.get("scaling", {}).get("rows", []) if r.get("status") == "ok"]
    if sc:
        top = max(r["queries"] for r in sc)
        for r in sc:
            if r["queries"] == top:
                lines.append(f"scaling L={top} {r['model']}: {r['timing']['median_ms']:.2f} ms, "
                             f"peak {fmt_bytes(r.get('peak_bytes'))}")
    for r in s.get("table4", {}).get("rows", []):
        if r.get("status") == "ok":
            peak = r.get("peak_bytes")
            peak = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in peak.items()) if isinstance(peak, dict) \
                else fmt_bytes(peak)
            lines.append(f"table4 {r['name']}: {r['params'] / 1e6:.1f} M params, peak {peak}")
    for name, sec in s.items():
        errs = [r for r in sec.get("rows", []) if r.get("status") == "error"]
        if sec.get("error") or errs:
            lines.append(f"ERRORS in {name}: " + (sec.get("error") or "")
                         + "; ".join(f"{r.get('key') or r.get('model') or r.get('name')}: {r['reason']}"
                                     for r in errs[:5]))
    return lines


def main(argv=None) -> int:
    args = _parse(argv)
    if args.commit:
        os.environ["APM_FAST_COMMIT"] = args.commit
    import torch

    from apm_fast.bench import BenchOptions, run_suite

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("run_gpu_bench: no CUDA device here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    kw = dict(device=args.device, out=args.out, repeats=args.repeats, warmup=args.warmup,
              skip=tuple(args.skip), authors_presets=tuple(args.authors_presets),
              compile_presets=tuple(args.compile_presets), time_budget_s=args.time_budget)
    if args.presets:
        kw["presets"] = tuple(args.presets)
    if args.only:
        kw["sections"] = tuple(args.only)
    if args.scaling_grids:
        kw["scaling_grids"] = tuple(args.scaling_grids)
    if args.tpt_towers is not None:
        kw["tpt_towers"] = tuple(args.tpt_towers)
    quick = args.quick or torch.device(args.device).type == "cpu"
    options = BenchOptions.quick_defaults(**kw) if quick else BenchOptions(**kw)
    t0 = time.perf_counter()
    result = run_suite(options)
    print("\n== summary")
    for line in _summary(result):
        print(line)
    print(f"total {time.perf_counter() - t0:.0f} s; results in {result.out_dir}")
    return 0 if result.gate_passed else 1


if __name__ == "__main__":
    sys.exit(main())
