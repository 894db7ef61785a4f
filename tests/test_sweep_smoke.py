"""benchmarks/sweep_triton.py run end to end on tiny shapes in Triton's interpreter (``--smoke``):
candidates compiled in worker processes, checked against torch, timed, the best written as a
tuned-config table whose keys are the ones the launchers look up."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_smoke_run(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_triton.py"), "--smoke",
                           "--out", str(out), "--jobs", "2", "--only", "first_layer_linear,head linear_bwd_weight"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "sweep_triton.json").read_text())
    probs = res["problems"]
    assert {p["name"] for p in probs} == {"fc2 first_layer_linear", "head linear_bwd_weight"}
    assert len(probs) == 4                       # each at (S, B) = (1, 1) and (2, 3)
    for p in probs:
        ran = [c for c in p["candidates"] if "ms" in c]
        assert ran and p["best"] in ran
        assert all(c["rel_err"] <= res["tolerance"] for c in ran)
        kinds = {(c["config"].get("tma"), c["config"].get("materialize", False)) for c in ran}
        assert (False, False) in kinds           # the pointer kernel is always among them
        if p["name"] == "fc2 first_layer_linear":
            assert (True, True) in kinds or (False, True) in kinds    # the materialized first layer
        prim = p["name"].split(" ")[1]
        assert p["key"][0] == prim and p["key"][1:3] == [p["S"], p["B"] if prim.startswith("first") else 1]
    # the whole table file back: every GPU's block as it was, the winners in this run's own block
    from apm_fast.kernels import tuned_configs
    from apm_fast.kernels.configs import GemmCfg, WgradCfg

    table = (out / "tuned_configs.py").read_text()
    assert ast.get_docstring(ast.parse(table)) == ast.get_docstring(ast.parse(open(tuned_configs.__file__).read()))
    tuned = ast.literal_eval(table.split("TUNED = ", 1)[1])
    assert {g: b for g, b in tuned.items() if g in tuned_configs.TUNED} == tuned_configs.TUNED
    (mine,) = [b for g, b in tuned.items() if g not in tuned_configs.TUNED]
    assert mine["capability"] is None and "sweep_triton.py" in mine["source"]     # the interpreter's block
    assert set(mine["configs"]) == {tuple(p["key"]) for p in probs}
    for key, entry in mine["configs"].items():
        (WgradCfg if "bwd_weight" in key[0] else GemmCfg).from_dict(entry["config"])
        best = next(p["best"] for p in probs if tuple(p["key"]) == key)
        assert entry["config"] == best["config"] and entry["tflops"] == round(best["tflops"])


def test_sweep_sets_and_the_kept_activation_forward(tmp_path):
    """--sets picks the (students, images) pairs; "fc2 linear" is the first consumer's forward on
    the kept activation (a plain GEMM over B L rows); a malformed pair is refused by name."""
    script = os.path.join(ROOT, "benchmarks", "sweep_triton.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, script, "--smoke", "--out", str(out), "--jobs", "1", "--only", "fc2 linear",
                           "--sets", "1x2"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probs = json.loads((out / "sweep_triton.json").read_text())["problems"]
    assert [(p["name"], p["S"], p["B"]) for p in probs] == [("fc2 linear", 1, 2)]
    assert probs[0]["key"] == ["linear", 1, 1, 2 * 32, 32, 64]      # smoke dims: L 32, widths 64 -> 32
    assert any("ms" in c for c in probs[0]["candidates"])
    bad = subprocess.run([sys.executable, script, "--smoke", "--out", str(out), "--sets", "1x"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0 and "--sets" in bad.stderr and "'1x'" in bad.stderr
