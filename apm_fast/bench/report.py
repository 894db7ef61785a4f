"""Speedups (only after a passed gate) and the printed tables."""
from __future__ import annotations

from typing import Dict, List

from . import spec_numbers
from .flops import FLOPS_CONVENTION

__all__ = ["finalize", "format_section", "format_gate", "fmt_bytes", "fmt_flops", "summary_lines"]

_SPEEDUP_FIELDS = ("speedup_vs_eager", "speedup_vs_authors", "speedup_vs_reference",
                   "speedup_vs_clip")


def _gate_status(gate, preset, path) -> str:
    checks = [c for c in gate.checks if c.preset == preset and c.path == path]
    errors = [e for e in gate.errors if e["preset"] == preset and e["path"] == path]
    if errors or any(not c.passed for c in checks):
        return "failed"
    return "passed" if checks else "not checked"


def _ok(row) -> bool:
    return row.get("status") == "ok" and "timing" in row


def _median(row) -> float:
    return row["timing"]["median_ms"]


def finalize(name: str, result: dict, gate) -> dict:
    """Add gate status and speedups to a section's rows; no speedup at all if the gate failed."""
    rows = result.get("rows", [])
    passed = gate.passed
    result["gate_passed"] = passed
    result["speedups_suppressed"] = None if passed else (
        "correctness gate failed (" + ", ".join(gate.failed_paths()) + "): no speedup is reported")
    for row in rows:
        for f in _SPEEDUP_FIELDS:
            row.pop(f, None)
    if name == "ttt_step":
        for row in rows:
            row["gate"] = _gate_status(gate, row["preset"], row["key"])
        base = {(r["preset"], r["key"]): _median(r) for r in rows if _ok(r)}
        for row in rows:
            if not _ok(row):
                continue
            for ref, field in (("eager", "speedup_vs_eager"), ("authors", "speedup_vs_authors")):
                b = base.get((row["preset"], ref))
                row[field] = (b / _median(row)) if (passed and b) else None
    elif name == "forward":
        for row in rows:
            row["gate"] = _gate_status(gate, row["preset"], row["backend"])
        base = {(r["preset"], r["batch"], r["mode"]): _median(r) for r in rows
                if _ok(r) and r["backend"] == "reference"}
        for row in rows:
            if _ok(row):
                b = base.get((row["preset"], row["batch"], row["mode"]))
                row["speedup_vs_reference"] = (b / _median(row)) if (passed and b) else None
    elif name == "throughput":
        for row in rows:
            if row.get("backend"):
                row["gate"] = _gate_status(gate, row["preset"], row["backend"])
        base = {r["preset"]: r["images_per_s"] for r in rows
                if r.get("status") == "ok" and r.get("backend") == "reference" and "images_per_s" in r}
        for row in rows:
            if row.get("status") == "ok" and "images_per_s" in row:
                b = base.get(row["preset"])
                row["speedup_vs_reference"] = (row["images_per_s"] / b) if (passed and b) else None
    elif name == "capabilities":
        authors = next((r["median_ms"] for r in rows if r.get("key") == "distill/reference"
                        and r.get("status") == "ok" and r.get("median_ms")), None)
        for row in rows:
            if (row.get("key", "").startswith("distill/") and row.get("status") == "ok"
                    and row.get("backend") not in ("teacher", "reference") and row.get("median_ms")):
                row["speedup_vs_authors"] = (authors / row["median_ms"]) if (passed and authors) else None
    elif name == "scaling":
        # only rows timed the same way divide: a replayed graph against eager calls would
        # measure the host's launches, not the models
        clip = {r["grid"]: r for r in rows if _ok(r) and r["model"] == "clip"}
        for row in rows:
            row.pop("speedup_vs_clip_omitted", None)
            if _ok(row) and row["model"] == "apm":
                c = clip.get(row["grid"])
                if c is not None and c.get("timing_mode") != row.get("timing_mode"):
                    row["speedup_vs_clip"] = None
                    why = row.get("timing_mode_reason") or c.get("timing_mode_reason")
                    row["speedup_vs_clip_omitted"] = (f"APM timed {row.get('timing_mode')}, CLIP "
                                                      f"{c.get('timing_mode')}: not comparable"
                                                      + (f" ({why})" if why else ""))
                else:
                    row["speedup_vs_clip"] = (_median(c) / _median(row)) if (passed and c) else None
    return result


# ---------------------------------------------------------------------------------- formatting
def fmt_bytes(n) -> str:
    """Bytes in binary units (MiB = 2**20 B, GiB = 2**30 B), as torch's allocator counts them."""
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def fmt_flops(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("TF", 1e12), ("GF", 1e9), ("MF", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} F"


def _fmt_time(row) -> str:
    t = row["timing"]
    return f"{t['median_ms']:.3f} [{t['p20_ms']:.3f}-{t['p80_ms']:.3f}]"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.1f}x"


def _table(header: List[str], body: List[List[str]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]


def _status_cell(row) -> str:
    return f"{row['status']}: {row.get('reason', '')}"


def _tf(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def format_gate(gate) -> List[str]:
    lines = [f"correctness gate: {'PASSED' if gate.passed else 'FAILED'} "
             f"({len(gate.checks)} checks, {len(gate.errors)} errors)"]
    bad = [c for c in gate.checks if not c.passed]
    for c in bad[:20]:
        lines.append(f"  FAILED {c.preset}/{c.path} {c.check} [{c.precision}]: rel. error "
                     f"{c.rel_err:.3g} > {c.tol:.3g}")
    for e in gate.errors[:20]:
        lines.append(f"  ERROR  {e['preset']}/{e['path']}: {e['error']}")
    return lines


def format_section(name: str, result: dict) -> List[str]:
    """The section's table; rows that did not run say why in the last column."""
    rows = result.get("rows", [])
    out = []
    if name == "ttt_step":
        body = []
        for r in rows:
            spec = spec_numbers.H100_TTT_STEP_MS.get(r["key"]) if r["preset"] == "ttt-l14" else None
            if _ok(r):
                note = "GATE FAILED" if r.get("gate") == "failed" else ""
                body.append([r["preset"], r["key"], r.get("precision", ""), _fmt_time(r),
                             fmt_bytes(r.get("peak_bytes")), _tf(r.get("tflops")),
                             _fmt_x(r.get("speedup_vs_eager")), _fmt_x(r.get("speedup_vs_authors")),
                             r.get("gate", ""), "-" if spec is None else f"{spec} ms", note])
            else:
                body.append([r["preset"], r["key"]] + [""] * 8 + [_status_cell(r)])
        out += _table(["preset", "implementation", "prec", "ms median [p20-p80]", "peak",
                       "TFLOP/s", "vs eager", "vs authors", "gate", "H100 spec", "notes"], body)
    elif name == "forward":
        body = []
        for r in rows:
            if _ok(r):
                body.append([r["preset"], r["backend"], str(r["batch"]), r["mode"], _fmt_time(r),
                             f"{r['ms_per_image']:.4f}", _tf(r.get("tflops")),
                             fmt_bytes(r.get("peak_bytes")), _fmt_x(r.get("speedup_vs_reference")),
                             "GATE FAILED" if r.get("gate") == "failed" else ""])
            else:
                body.append([r["preset"], r["backend"], str(r.get("batch", "")), r.get("mode", "")]
                            + [""] * 5 + [_status_cell(r)])
        out += _table(["preset", "backend", "B", "output", "ms median [p20-p80]", "ms/image",
                       "TFLOP/s", "peak", "vs reference", "notes"], body)
    elif name == "throughput":
        body = []
        for r in rows:
            if r.get("status") == "ok" and "images_per_s" in r:
                reset = r.get("reset_ms")
                body.append([r["preset"], r["key"], f"{r['images_per_s']:.1f}",
                             f"{1e3 / r['images_per_s']:.2f}", "" if reset is None else f"{reset:.3f}",
                             fmt_bytes(r.get("peak_bytes")), _fmt_x(r.get("speedup_vs_reference")),
                             "GATE FAILED" if r.get("gate") == "failed" else ""])
            else:
                body.append([r["preset"], r["key"], "", "", "", "", "", _status_cell(r)])
        out += _table(["preset", "trainer", "images/s", "ms/image", "reset ms", "peak", "vs reference", "notes"],
                      body)
    elif name == "scaling":
        body = []
        for r in rows:
            if _ok(r):
                body.append([str(r["queries"]), r["model"], r.get("timing_mode", ""), _fmt_time(r),
                             fmt_bytes(r.get("peak_bytes")), fmt_flops(r.get("flops")),
                             _fmt_x(r.get("speedup_vs_clip")), r.get("speedup_vs_clip_omitted", "")])
            else:
                body.append([str(r["queries"]), r["model"], "", "", "", "", "", _status_cell(r)])
        out += _table(["queries", "model", "timed", "ms median [p20-p80]", "peak",
                       f"FLOPs ({FLOPS_CONVENTION})", "APM vs CLIP", "notes"], body)
    elif name == "table4":
        out += format_table4(result)
    elif result.get("columns"):
        out += _generic(result)
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    if result.get("speedups_suppressed"):
        out.append(f"SPEEDUPS SUPPRESSED: {result['speedups_suppressed']}")
    return out


def _cell(row, path):
    v = row
    for part in path.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return fmt_bytes(v) if path.endswith("bytes") else f"{v:.4g}"
    if isinstance(v, int) and path.endswith("bytes"):
        return fmt_bytes(v)
    return str(v)


def _generic(result: dict) -> List[str]:
    """The table of a section that names its ``columns`` ((label, dotted key) pairs)."""
    cols = result["columns"]
    body = [[_cell(r, k) for _, k in cols] + [r.get("reason", "") if r.get("status") != "ok" else ""]
            for r in result.get("rows", [])]
    return _table([label for label, _ in cols] + ["notes"], body)


def _fmt_params(n) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def table4_rows(result: dict) -> List[Dict[str, str]]:
    """Table 4 as strings (one dict per line), shared by the printed table and the plot. A
    student row followed by its teacher's row gets a third line with their sum."""
    out = []
    student = None
    for r in result.get("rows", []):
        if r.get("status") != "ok":
            out.append({"model": r.get("name", "?"), "role": r.get("role", ""), "params": "-",
                        "peak": "-", "flops_1": "-", "flops_t": "-",
                        "measured_t": f"{r.get('status', '')}: {r.get('reason', '')}"})
            student = None
            continue
        peak = r.get("peak_bytes")
        if isinstance(peak, dict):
            peak = " / ".join(f"{fmt_bytes(v)}" for v in peak.values())
        else:
            peak = fmt_bytes(peak)
        fl = r["flops"]
        if r["role"] == "student":
            a = fl["rewritten"]["analytic"]["by_t"]
            p = fl["plain"]["analytic"]["by_t"]
            m = fl["plain"]["measured"]["by_t"]
            one = f"{fmt_flops(p[0])} plain / {fmt_flops(a[0])} rewr."
            tt = f"{fmt_flops(p[-1])} plain / {fmt_flops(a[-1])} rewr."
            meas = fmt_flops(m[-1]) + " / " + fmt_flops(fl["rewritten"]["measured"]["by_t"][-1])
        else:
            a = fl["analytic"]["by_t"]
            m = fl["measured"]["by_t"]
            one, tt, meas = fmt_flops(a[0]), fmt_flops(a[-1]), fmt_flops(m[-1])
        out.append({"model": r["name"], "role": r["role"], "params": _fmt_params(r["params"]),
                    "peak": peak, "flops_1": one, "flops_t": tt, "measured_t": meas})
        if r["role"] == "teacher" and student is not None:
            sp = student["flops"]["plain"]["analytic"]["by_t"]
            sr = student["flops"]["rewritten"]["analytic"]["by_t"]
            out.append({"model": "  = student + teacher", "role": "APM total",
                        "params": _fmt_params(student["params"] + r["params"]), "peak": "",
                        "flops_1": f"{fmt_flops(sp[0] + a[0])} plain / {fmt_flops(sr[0] + a[0])} rewr.",
                        "flops_t": f"{fmt_flops(sp[-1] + a[-1])} plain / {fmt_flops(sr[-1] + a[-1])} rewr.",
                        "measured_t": ""})
        student = r if r["role"] == "student" else None
    return out


def format_table4(result: dict) -> List[str]:
    t_max = result.get("t_max", 20)
    if not result.get("rows"):
        return ["(no rows)"]
    body = [[d["model"], d["role"], d["params"], d["peak"], d["flops_1"], d["flops_t"], d["measured_t"]]
            for d in table4_rows(result)]
    return [f"FLOPs: {FLOPS_CONVENTION}"] + _table(
        ["model", "role", "params", "peak memory", "FLOPs t=1 (analytic)", f"FLOPs t={t_max} (analytic)",
         f"t={t_max} measured"], body)


def summary_lines(result) -> List[str]:
    """A few lines with the numbers that matter (printed last), beside the spec's H100 numbers."""
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
    for r in s.get("throughput", {}).get("rows", []) + s.get("distributed", {}).get("rows", []):
        if r.get("status") == "ok" and "images_per_s" in r:
            lines.append(f"throughput {r['preset']} {r['key']}: {r['images_per_s']:.1f} images/s")
    for r in s.get("evaluation", {}).get("rows", []):
        if r.get("status") == "ok":
            lines.append(f"evaluation {r['key']}: " + ", ".join(
                f"{m} {r[f'{m}_images_per_s']:.1f}" for m in ("zeroshot", "ensemble", "apm", "tpt", "zero", "all")
                if r.get(f"{m}_images_per_s") is not None) + " images/s")
    for r in s.get("ab", {}).get("rows", []):
        if r.get("status") == "ok" and "vs_first" in r:
            lines.append(f"{r['key']}: {r['ms_per_step']:.4f} ms/step, {r['images_per_s']:.1f} images/s "
                         f"({r['vs_first']:.3f}x the first value, median of {r['turns']} turns)")
    for r in s.get("engine", {}).get("rows", []):
        if r.get("status") == "ok" and "ms_per_step" in r:
            where = " ".join(x for x in (r.get("preset"), r["key"]) if x)
            lines.append(f"engine {where}: {r['ms_per_step']:.3f} ms/step ({r['tflops']:.0f} TFLOP/s)")
    for r in s.get("primitives", {}).get("rows", []):
        if r.get("status") == "ok" and r.get("vs_best", 1.0) > 1.15:
            lines.append(f"primitive {r['key']}: {r['vs_best']:.2f}x the best table")
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
