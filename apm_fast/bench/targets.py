"""The headline numbers of one run (the performance targets), read out of its sections' results.

``targets.json`` holds, from one run at one commit, the values the project's targets are stated
in (``ttt-l14``, 20 steps, bf16 compute): the engine's graph-replayed step at one image per table
(``engine`` section), the plain eager PyTorch step (``step`` section), 64 students side by side
with fp32 and bf16 Adam moments and the end-to-end rate with a ViT-L/14 teacher (``throughput``),
the 50,176-query chunked forward's time and peak memory (``scaling``; ``_mb`` in decimal megabytes,
1e6 B, the unit of the target, ``_mib`` the same in 2^20 B), and whether the
correctness gate passed. A value whose section did not run (or whose row failed) is null, with
the reason in ``missing``. ``targets.md`` is the same as a table, next to each target.
"""
from __future__ import annotations

from typing import Dict, Optional

__all__ = ["TARGETS", "collect", "markdown"]

# key -> (what, target, "<=" or ">="); None: no target (context)
TARGETS = {
    "step_ms_triton": ("one TTT step, one image, triton table + graph (ms)", 0.30, "<="),
    "step_ms_cuda": ("same, cuda table + graph (ms)", None, None),
    "step_ms_torch": ("same, torch table + graph (ms)", None, None),
    "step_ms_eager": ("same, plain eager PyTorch (autograd, fused Adam) (ms)", None, None),
    "side_by_side_img_s": ("64 students side by side, fp32 moments (images/s)", 220.0, ">="),
    "side_by_side_img_s_bf16_moments": ("same, bf16 moments (images/s)", 300.0, ">="),
    "end_to_end_img_s_l14": ("end to end, ViT-L/14 teacher, after the first batch (images/s)", 200.0, ">="),
    "scaling_50176_ms": ("50,176 location queries, chunked forward (ms)", 12.0, "<="),
    "scaling_50176_mb": ("same, peak memory after a first call, capture and weights included (MB = 1e6 B)",
                         350.0, "<="),
    "scaling_50176_mib": ("same, in MiB (2^20 B)", None, None),
    "scaling_50176_first_call_mb": ("same, the first call (one-time autotuning) (MB = 1e6 B)", None, None),
    "scaling_50176_first_call_mib": ("the same first call, in MiB (2^20 B)", None, None),
}
PRESET = "ttt-l14"
STUDENTS = 64
QUERIES = 50176


def _rows(results: dict, section: str):
    return [r for r in (results.get(section) or {}).get("rows", []) if isinstance(r, dict)]


def _find(results, section, key, field, preset=PRESET):
    """(value, None) of ``field`` in the row ``key`` of ``section``, or (None, why)."""
    rows = [r for r in _rows(results, section) if r.get("key") == key
            and (preset is None or r.get("preset", preset) == preset)]
    if section not in results:
        return None, f"section {section!r} not in this run"
    if not rows:
        return None, f"{section}: no row {key!r}"
    r = rows[0]
    if r.get("status") != "ok":
        return None, f"{section}/{key}: {r.get('status')} ({r.get('reason', '')})"[:200]
    v = _field(r, field)
    return (None, f"{section}/{key}: no {field}") if v is None else (float(v), None)


def _field(row: dict, field: str):
    """``row``'s value at a dotted path (``"timing.median_ms"``), or None."""
    v = row
    for part in field.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def collect(results: Dict[str, dict], gate_passed: bool, commit: Optional[str], machine_line: str = "") -> dict:
    """The targets document of one run (``results``: section name -> its result dict)."""
    got, missing = {}, {}

    def put(name, found):
        got[name], why = found
        if why:
            missing[name] = why

    for table in ("triton", "cuda", "torch"):
        put(f"step_ms_{table}", _find(results, "engine", f"latency/{table}/graph", "ms_per_step"))
    put("step_ms_eager", _find(results, "ttt_step", "eager", "timing.median_ms"))
    fastest = _fastest_side_by_side(results)
    put("side_by_side_img_s", _find(results, "throughput", f"side-by-side/{fastest}/S={STUDENTS}", "images_per_s"))
    put("side_by_side_img_s_bf16_moments",
        _find(results, "throughput", f"side-by-side/{fastest}/S={STUDENTS}/bf16-moments", "images_per_s"))
    e2e = [r for r in _rows(results, "throughput") if str(r.get("key", "")).startswith("end-to-end/")
           and r.get("preset") == PRESET]
    put("end_to_end_img_s_l14", _find(results, "throughput", e2e[0]["key"], "images_per_s_after_first_batch")
        if e2e else (None, "throughput: no end-to-end row"))
    put("scaling_50176_ms", _scaling(results, "timing.median_ms", 1.0))
    # the target is stated in decimal megabytes; the binary value (what torch's allocator and the
    # printed tables count in) beside it
    put("scaling_50176_mb", _scaling(results, "peak_bytes", 1e-6))
    put("scaling_50176_mib", _scaling(results, "peak_bytes", 1.0 / 2 ** 20))
    put("scaling_50176_first_call_mb", _scaling(results, "first_call_peak_bytes", 1e-6))
    put("scaling_50176_first_call_mib", _scaling(results, "first_call_peak_bytes", 1.0 / 2 ** 20))
    doc = {"commit": commit, **got, "gate_passed": bool(gate_passed), "side_by_side_table": fastest,
           "preset": PRESET, "precision": _precision(results), "machine": machine_line, "missing": missing}
    # a number from a run whose gate failed meets nothing
    doc["met"] = {k: bool(gate_passed) and _met(k, v) for k, v in got.items() if TARGETS[k][1] is not None}
    return doc


def _precision(results) -> Optional[str]:
    """What the steps were measured in, from the engine's rows: the GEMMs' dtype and Adam's
    moments (fp32 master weights; the bf16-moment rate's moments are bf16)."""
    for r in _rows(results, "engine"):
        if r.get("status") == "ok" and r.get("precision"):
            return (f"{r['precision']} GEMMs, fp32 master weights, {r.get('moments', 'fp32')} Adam moments "
                    f"(side_by_side_img_s_bf16_moments: bf16 moments)")
    return None


def _fastest_side_by_side(results) -> str:
    best, name = -1.0, "triton"
    for r in _rows(results, "throughput"):
        k = str(r.get("key", ""))
        if r.get("status") == "ok" and k.endswith(f"/S={STUDENTS}") and k.startswith("side-by-side/") \
                and r.get("preset") == PRESET and r.get("images_per_s", 0) > best:
            best, name = r["images_per_s"], k.split("/")[1]
    return name


def _scaling(results, field, scale):
    rows = [r for r in _rows(results, "scaling") if r.get("model") == "apm" and r.get("queries") == QUERIES]
    if "scaling" not in results:
        return None, "section 'scaling' not in this run"
    if not rows or rows[0].get("status") != "ok":
        return None, f"scaling: no measured APM point at {QUERIES} queries"
    v = _field(rows[0], field)
    return (None, f"scaling: no {field}") if v is None else (float(v) * scale, None)


def _met(key, value) -> Optional[bool]:
    target, op = TARGETS[key][1], TARGETS[key][2]
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


def markdown(doc: dict) -> str:
    """The targets document as a Markdown table: what, measured, target, met."""
    lines = [f"Targets of one run (commit {doc.get('commit')}, {doc.get('machine')}, `{doc.get('preset')}`, "
             f"correctness gate {'passed' if doc.get('gate_passed') else 'FAILED: no target is met'}"
             + (f"; {doc['precision']}" if doc.get("precision") else "") + "):", "",
             "| what | measured | target | met |", "| --- | --- | --- | --- |"]
    for key, (what, target, op) in TARGETS.items():
        v = doc.get(key)
        shown = "not measured" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")
        goal = "" if target is None else f"{op} {target:g}"
        met = doc.get("met", {}).get(key)
        lines.append(f"| {what} | {shown} | {goal} | {'' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines) + "\n"
