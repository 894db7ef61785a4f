"""The default backend on a GPU is the table measured fastest there (apm_fast.backends.measured)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from apm_fast import backends
from apm_fast.backends import measured
from apm_fast.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_file(tmp_path, gpu, rows, device="cuda", name="ttt_step.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"suite": "ttt_step", "machine": {"device": device, "gpu": gpu, "commit": "abc1234"},
                                "rows": rows}))
    return str(path)


def _row(p, key, ms, status="ok"):
    return {"preset": p, "key": key, "status": status, "timing": {"median_ms": ms} if status == "ok" else None}


@pytest.fixture
def table(monkeypatch, tmp_path):
    """A packaged table with one fake GPU where cuda wins at ttt-b16 and triton at ttt-l14."""
    rows = [_row("ttt-b16", "engine/torch", 3.0), _row("ttt-b16", "engine/triton", 2.0),
            _row("ttt-b16", "engine/cuda", 1.0), _row("ttt-l14", "engine/torch", 3.0),
            _row("ttt-l14", "engine/triton", 1.0), _row("ttt-l14", "engine/cuda", 5.0),
            _row("ttt-l14", "triton+graph", 0.1)]             # not the engine's row: ignored
    t = measured.record([_step_file(tmp_path, "Fake GPU", rows)])
    monkeypatch.setattr(measured, "_LOADED", t)
    return t


def test_the_packaged_table_is_what_the_committed_results_give(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(glob.glob("benchmarks/results/*/suite/engine.json")) + \
        sorted(glob.glob("benchmarks/results/*/suite/ttt_step.json"))
    assert files, "no committed engine or ttt_step results"
    with open(measured.PATH) as f:
        packaged = json.load(f)
    assert packaged == json.loads(json.dumps(measured.record(files))), \
        "apm_fast/data/fastest.json is stale: python -m apm_fast.backends.measured " + " ".join(files)


def test_record_prefers_engine_rows_and_skips_cpu_and_failed_rows(tmp_path):
    gpu = _step_file(tmp_path, "G", [_row("ttt-l14", "engine/triton", 1.23456), _row("ttt-l14", "triton+graph", 9.0),
                                     _row("ttt-l14", "engine/cuda", 0.5, status="error")], name="a.json")
    old = _step_file(tmp_path, "H", [_row("ttt-b16", "cuda+graph", 2.0), _row("ttt-b16", "torch", 0.1)],
                     name="b.json")
    cpu = _step_file(tmp_path, "cpu", [_row("ttt-l14", "engine/torch", 1.0)], device="cpu", name="c.json")
    t = measured.record([gpu, old, cpu])
    assert set(t["gpus"]) == {"G", "H"}
    assert t["gpus"]["G"]["step_ms"] == {"ttt-l14": {"triton": 1.2346}} and t["gpus"]["G"]["row"] == "engine/<table>"
    assert t["gpus"]["H"]["step_ms"] == {"ttt-b16": {"cuda": 2.0}} and t["gpus"]["H"]["row"] == "<table>+graph"
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"suite": "forward", "rows": []}))
    with pytest.raises(ValueError, match="expected an engine or ttt_step result file"):
        measured.record([str(bad)])


@pytest.mark.parametrize("flags, why", [({"gate_passed": False}, "its correctness gate did not pass"),
                                        ({"quick": True}, "a --quick run"), ({"partial": True}, "a partial run")])
def test_record_refuses_a_run_whose_timings_cannot_choose_a_default(tmp_path, flags, why):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"suite": "engine", "machine": {"device": "cuda", "gpu": "G"}, **flags,
                                "rows": [_row("ttt-l14", "latency/cuda/graph", 0.001)]}))
    with pytest.raises(ValueError, match=f"engine.json: cannot choose the default tables from {why}"):
        measured.record([str(path)])


def test_record_prefers_the_engine_sections_back_to_back_steps(tmp_path):
    """For one GPU, the engine section's latency rows (20 steps back to back, as the trainer runs
    them; a row's preset is its own, else the section's engine_preset) win over the step section's
    rows, in either order of the files; a GPU with only step results keeps those."""
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({
        "suite": "engine", "machine": {"device": "cuda", "gpu": "G", "commit": "def5678"},
        "options": {"engine_preset": "ttt-l14"},
        "rows": [{"key": "latency/triton/graph", "status": "ok", "ms_per_step": 0.471},
                 {"key": "latency/cuda/graph", "status": "ok", "ms_per_step": 0.488},
                 {"key": "latency/cuda/graph/trigger-written", "status": "ok", "ms_per_step": 0.3},
                 {"key": "latency/torch/graph", "status": "skipped"},
                 {"key": "latency/triton/graph", "status": "ok", "ms_per_step": 0.25, "preset": "ttt-b16"},
                 {"key": "latency/cuda/graph", "status": "ok", "ms_per_step": 0.24, "preset": "ttt-b16"},
                 {"key": "latency/cuda/graph", "status": "error", "preset": "ttt-h14"}]}))
    step = _step_file(tmp_path, "G", [_row("ttt-l14", "engine/triton", 0.566), _row("ttt-l14", "engine/cuda", 0.537)])
    other = _step_file(tmp_path, "H", [_row("ttt-l14", "engine/cuda", 0.5)], name="h.json")
    for files in ([str(engine), step, other], [step, str(engine), other]):
        t = measured.record(files)
        assert t["gpus"]["G"] == {"commit": "def5678", "file": os.path.normpath(str(engine)).replace(os.sep, "/"),
                                  "row": "latency/<table>/graph",
                                  "step_ms": {"ttt-b16": {"triton": 0.25, "cuda": 0.24},
                                              "ttt-l14": {"triton": 0.471, "cuda": 0.488}}}
        assert t["gpus"]["H"]["row"] == "engine/<table>"


def test_choose_follows_the_measurement_per_preset(table):
    every = ["torch", "triton", "cuda"]
    name, why = measured.choose("Fake GPU", preset("ttt-b16"), every)
    assert name == "cuda" and "ttt-b16 on Fake GPU" in why and "cuda 1.000 ms" in why
    assert measured.choose("Fake GPU", preset("ttt-l14"), every)[0] == "triton"
    assert measured.choose("Fake GPU", preset("ttt-l14"), ["torch", "cuda"])[0] == "torch"   # triton not here
    assert measured.choose("Fake GPU", preset("ttt-l14", init_std=0.5), every)[0] == "triton"  # init: same shapes
    # not a preset: the sum over the GPU's presets (torch 6, triton 3, cuda 6)
    name, why = measured.choose("Fake GPU", preset("ttt-l14", grid=8), every)
    assert name == "triton" and "not a preset" in why
    name, why = measured.choose("Fake GPU", preset("ssl-l14"), every)      # a preset without a TTT step
    assert name == "triton" and "ssl-l14 has no TTT step measured there" in why
    # a GPU never measured: the fixed order
    name, why = measured.choose("Other GPU", preset("ttt-b16"), every)
    assert name == measured.FALLBACK[0] and "no measurement for Other GPU" in why
    assert measured.choose("Other GPU", None, ["cuda", "torch"])[0] == "cuda"


def test_tables_measured_within_the_noise_are_tied_and_the_fixed_order_decides(monkeypatch, tmp_path):
    rows = [_row("ttt-l14", "engine/triton", 0.6193), _row("ttt-l14", "engine/cuda", 0.6172),
            _row("ttt-l14", "engine/torch", 1.66), _row("ttt-b16", "engine/triton", 1.0),
            _row("ttt-b16", "engine/cuda", 0.95)]
    monkeypatch.setattr(measured, "_LOADED", measured.record([_step_file(tmp_path, "G", rows)]))
    every = ["torch", "triton", "cuda"]
    name, why = measured.choose("G", preset("ttt-l14"), every)        # cuda 0.3 % faster: a tie
    assert name == "triton" and "within 2%" in why and "cuda 0.617 ms, triton 0.619 ms" in why
    assert measured.choose("G", preset("ttt-l14"), ["torch", "cuda"])[0] == "cuda"
    name, why = measured.choose("G", preset("ttt-b16"), every)        # 5 % faster: measured fastest
    assert name == "cuda" and why.startswith("measured fastest")


def test_default_backend_on_a_gpu_uses_the_gpu_name_and_the_model(monkeypatch, table):
    monkeypatch.setattr(backends, "_status", lambda name: (True, ""))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert backends.default_backend("cuda:0", preset("ttt-b16")) == "cuda"
    assert backends.default_backend("cuda", preset("ttt-l14")) == "triton"
    assert backends.resolve_backend(None, "cuda", preset("ttt-b16")) == "cuda"
    assert backends.default_backend("cpu", preset("ttt-b16")) == "torch"
    monkeypatch.setattr(backends, "_status", lambda name: (name == "torch", "missing"))
    assert backends.default_backend("cuda", preset("ttt-b16")) == "torch"


def test_info_says_the_default_and_why():
    out = subprocess.run([sys.executable, "-m", "apm_fast", "info"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr
    assert "default backend on cpu: torch (on the CPU" in out.stdout


def test_info_says_where_the_triton_configs_come_from(monkeypatch):
    """Per GPU: its own measured block, another GPU's of its compute capability, or none."""
    pytest.importorskip("triton")
    from apm_fast.commands.info import tuned_configs_row
    from apm_fast.kernels import tuned_configs

    cfg = {"config": {"bm": 64, "bn": 64, "bk": 64, "warps": 4, "stages": 3}, "tflops": 1, "cublas_tflops": 1}
    monkeypatch.setattr(tuned_configs, "TUNED", {
        "GPU A": {"capability": (9, 0), "source": "t", "configs": {("linear", 1, 1, 8, 8, 8): cfg}},
        "GPU B": {"capability": (9, 0), "source": "t", "configs": {("linear", 1, 1, 8, 8, 8): cfg,
                                                                    ("linear", 2, 1, 8, 8, 8): cfg}}})
    assert tuned_configs_row("GPU B", (9, 0)) == ("measured on this GPU, then GPU A (also sm_90): 2 shapes; "
                                                  "other shapes ranked by the shape heuristic")
    assert tuned_configs_row("GPU C", (9, 0)).startswith("measured on GPU A (also sm_90), then GPU B (also sm_90): 2")
    assert tuned_configs_row("GPU D", (8, 9)).startswith("none measured for sm_89")
