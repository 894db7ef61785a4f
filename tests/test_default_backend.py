"""The default backend on a GPU is the table measured fastest there for the preset and workload
(apm_fast.backends.measured)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from apm_fast import backends
from apm_fast.backends import measured
from apm_fast.config import PRESETS, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_file(tmp_path, gpu, rows, device="cuda", name="ttt_step.json", suite="ttt_step", commit="abc1234",
               started="2026-01-01T00:00:00+0000", **flags):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"suite": suite, "machine": {"device": device, "gpu": gpu, "commit": commit}, "started": started,
              "gate_passed": True, "quick": False, "partial": False, "rows": rows}
    path.write_text(json.dumps({**result, **flags}))
    return str(path)


def _row(p, key, ms, status="ok"):
    return {"preset": p, "key": key, "status": status, "timing": {"median_ms": ms} if status == "ok" else None}


def _fwd(p, name, ms, batch=1, mode="grid", eager=True):
    row = {"preset": p, "key": name, "backend": name, "batch": batch, "mode": mode, "status": "ok",
           "precision": "bf16", "ms_per_image": ms}
    return dict(row, eager_ms_per_image=3 * ms) if eager else row


@pytest.fixture
def table(monkeypatch, tmp_path):
    """A packaged table with one fake GPU where cuda wins the TTT step at ttt-b16 and triton at
    ttt-l14, and torch wins the forward at ttt-b16."""
    rows = [_row("ttt-b16", "engine/torch", 3.0), _row("ttt-b16", "engine/triton", 2.0),
            _row("ttt-b16", "engine/cuda", 1.0), _row("ttt-l14", "engine/torch", 3.0),
            _row("ttt-l14", "engine/triton", 1.0), _row("ttt-l14", "engine/cuda", 5.0),
            _row("ttt-l14", "triton+graph", 0.1)]             # not the engine's row: ignored
    fwd = [_fwd("ttt-b16", "torch", 0.5), _fwd("ttt-b16", "triton", 1.5), _fwd("ttt-b16", "cuda", 0.9),
           _fwd("ttt-b16", "torch", 9.0, batch=64)]          # batch 64: not the row the forward is read from
    t = measured.record([_step_file(tmp_path, "Fake GPU", rows),
                         _step_file(tmp_path, "Fake GPU", fwd, name="forward.json", suite="forward")])
    monkeypatch.setattr(measured, "_LOADED", t)
    return t


def test_the_packaged_table_is_what_the_committed_results_give(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert os.path.isdir("benchmarks/results"), "no committed results"
    with open(measured.PATH) as f:
        packaged = json.load(f)
    assert packaged == json.loads(json.dumps(measured.record(["benchmarks/results"]))), \
        "apm_fast/data/fastest.json is stale: python -m apm_fast.backends.measured benchmarks/results"


def test_the_packaged_table_has_both_workloads_with_their_sources():
    """Every entry names its file, commit, start, rows and precision; the forward comes from a
    forward section's file, the TTT step from an engine or ttt_step file."""
    with open(measured.PATH) as f:
        packaged = json.load(f)
    assert set(packaged["what"]) == set(measured.WORKLOADS)
    for gpu, workloads in packaged["gpus"].items():
        assert set(workloads) <= set(measured.WORKLOADS), gpu
        for workload, presets in workloads.items():
            for p, e in presets.items():
                assert e["commit"] and e["started"] and e["precision"] and len(e["ms"]) >= 2, (gpu, workload, p)
                name = os.path.basename(e["file"])
                assert name.startswith("forward") if workload == "forward" else not name.startswith("forward")
    assert "forward" in packaged["gpus"]["NVIDIA H200"]


def test_record_prefers_engine_rows_and_skips_cpu_and_failed_rows(tmp_path):
    gpu = _step_file(tmp_path, "G", [_row("ttt-l14", "engine/triton", 1.23456), _row("ttt-l14", "engine/torch", 2.0),
                                     _row("ttt-l14", "triton+graph", 9.0),
                                     _row("ttt-l14", "engine/cuda", 0.5, status="error")], name="a.json")
    old = _step_file(tmp_path, "H", [_row("ttt-b16", "cuda+graph", 2.0), _row("ttt-b16", "torch+graph", 3.0),
                                     _row("ttt-b16", "torch", 0.1)], name="b.json")
    cpu = _step_file(tmp_path, "cpu", [_row("ttt-l14", "engine/torch", 1.0), _row("ttt-l14", "engine/cuda", 1.0)],
                     device="cpu", name="c.json")
    t = measured.record([gpu, old, cpu])
    assert set(t["gpus"]) == {"G", "H"}
    g = t["gpus"]["G"]["ttt_step"]["ttt-l14"]
    assert g["ms"] == {"triton": 1.2346, "torch": 2.0} and g["row"].startswith("engine/<table>")
    assert g["not_measured"] == {"cuda": "error"}
    h = t["gpus"]["H"]["ttt_step"]["ttt-b16"]
    assert h["ms"] == {"cuda": 2.0, "torch": 3.0} and h["row"].startswith("<table>+graph")
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"suite": "throughput", "rows": []}))
    with pytest.raises(ValueError, match="expected an engine, ttt_step or forward result file"):
        measured.record([str(bad)])


@pytest.mark.parametrize("flags, why", [({"gate_passed": False}, "its correctness gate did not pass"),
                                        ({"gate_passed": None}, "a run with no passed correctness gate recorded"),
                                        ({"quick": True}, "a --quick run"), ({"partial": True}, "a partial run")])
@pytest.mark.parametrize("suite, rows", [("engine", [_row("ttt-l14", "latency/cuda/graph", 0.001)]),
                                         ("forward", [_fwd("ttt-l14", "cuda", 0.001), _fwd("ttt-l14", "torch", 1.0)])])
@pytest.mark.parametrize("as_folder", [False, True])
def test_record_refuses_a_run_whose_timings_cannot_choose_a_default(tmp_path, flags, why, suite, rows, as_folder):
    """Named or found in a folder, the file of a failed, quick or partial run is refused, not skipped."""
    path = _step_file(tmp_path, "G", rows, name=f"run/{suite}.json", suite=suite, **flags)
    with pytest.raises(ValueError, match=f"{suite}.json: cannot choose the default tables from {why}"):
        measured.record([str(tmp_path / "run") if as_folder else path])


def test_record_prefers_the_engine_sections_back_to_back_steps(tmp_path):
    """For one GPU and run, the engine section's latency rows (20 steps back to back, as the
    trainer runs them; a row's preset is its own, else the section's engine_preset) win over the
    step section's rows of the same run, in either order of the files; a GPU with only step
    results keeps those."""
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({
        "suite": "engine", "machine": {"device": "cuda", "gpu": "G", "commit": "def5678", "dtype": "bf16 autocast"},
        "started": "2026-01-02T00:00:00+0000", "gate_passed": True,
        "options": {"engine_preset": "ttt-l14"},
        "rows": [{"key": "latency/triton/graph", "status": "ok", "ms_per_step": 0.471},
                 {"key": "latency/cuda/graph", "status": "ok", "ms_per_step": 0.488},
                 {"key": "latency/cuda/graph/trigger-written", "status": "ok", "ms_per_step": 0.3},
                 {"key": "latency/torch/graph", "status": "skipped", "reason": "excluded by --skip"},
                 {"key": "latency/triton/graph", "status": "ok", "ms_per_step": 0.25, "preset": "ttt-b16"},
                 {"key": "latency/cuda/graph", "status": "ok", "ms_per_step": 0.24, "preset": "ttt-b16"},
                 {"key": "latency/cuda/graph", "status": "error", "preset": "ttt-h14"}]}))
    step = _step_file(tmp_path, "G", [_row("ttt-l14", "engine/triton", 0.566), _row("ttt-l14", "engine/cuda", 0.537)],
                      started="2026-01-02T00:00:00+0000")
    other = _step_file(tmp_path, "H", [_row("ttt-l14", "engine/cuda", 0.5), _row("ttt-l14", "engine/torch", 0.6)],
                       name="h.json")
    for files in ([str(engine), step, other], [step, str(engine), other]):
        t = measured.record(files)
        common = {"commit": "def5678", "started": "2026-01-02T00:00:00+0000",
                  "file": os.path.normpath(str(engine)).replace(os.sep, "/"),
                  "row": "latency/<table>/graph (steps replayed back to back)", "precision": "bf16 autocast"}
        assert t["gpus"]["G"] == {"ttt_step": {
            "ttt-b16": dict(common, ms={"triton": 0.25, "cuda": 0.24}, not_measured={"torch": "no row"}),
            "ttt-l14": dict(common, ms={"triton": 0.471, "cuda": 0.488},
                            not_measured={"torch": "skipped: excluded by --skip"})}}
        assert t["gpus"]["H"]["ttt_step"]["ttt-l14"]["row"].startswith("engine/<table>")


def test_record_takes_the_newest_complete_run_per_gpu_workload_and_preset(tmp_path):
    """The newest run that timed two tables or more wins over an older one with more preferred
    rows or more tables; a run timing one table alone, a run of code outside the history (its
    commit no hash) and a measured-not-kept folder are left out; other files in a folder are
    not result files of these sections and are passed over."""
    root = tmp_path / "results"
    _step_file(root, "G", [_row("ttt-l14", "triton+graph", 0.8), _row("ttt-l14", "cuda+graph", 1.2),
                           _row("ttt-l14", "torch+graph", 1.1), _row("ttt-b16", "triton+graph", 0.7),
                           _row("ttt-b16", "torch+graph", 0.6)],
               name="old/suite/ttt_step.json", commit="4d0346f", started="2026-11-23T22:37:59+0000")
    _step_file(root, "G", [{"key": "latency/triton/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.49},
                           {"key": "latency/cuda/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.53},
                           {"key": "latency/torch/graph", "preset": "ttt-l14", "status": "skipped",
                            "reason": "excluded by --skip"}],
               name="e5f03eb-ab/engine.json", suite="engine", commit="e5f03eb", started="2026-12-05T10:24:53+0000")
    _step_file(root, "G", [{"key": "latency/cuda/graph", "preset": "ttt-b16", "status": "ok", "ms_per_step": 0.1}],
               name="newer-cuda-only/engine.json", suite="engine", commit="1234567", started="2026-12-06T00:00:00+0000")
    _step_file(root, "G", [{"key": "latency/cuda/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.1},
                           {"key": "latency/triton/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.2}],
               name="exp/engine.json", suite="engine", commit="7d06490+math", started="2026-12-07T00:00:00+0000")
    _step_file(root, "G", [{"key": "latency/cuda/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.1},
                           {"key": "latency/triton/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.2}],
               name="measured-not-kept/x/engine.json", suite="engine", commit="abcdef0",
               started="2026-12-08T00:00:00+0000")
    _step_file(root, "G", [], name="old/suite/gate.json", suite="gate")
    (root / "old" / "profile.json").write_text("[1, 2]")
    notes = []
    t = measured.record([str(root)], notes)
    step = t["gpus"]["G"]["ttt_step"]
    assert step["ttt-l14"]["commit"] == "e5f03eb" and step["ttt-l14"]["ms"] == {"triton": 0.49, "cuda": 0.53}
    assert step["ttt-l14"]["not_measured"] == {"torch": "skipped: excluded by --skip"}
    assert step["ttt-b16"]["commit"] == "4d0346f" and step["ttt-b16"]["ms"] == {"triton": 0.7, "torch": 0.6}
    assert notes == [f"{root / 'exp' / 'engine.json'}: left out: its commit '7d06490+math' is not a commit hash "
                     "(code outside the history)"]


def test_record_reads_the_forward_at_one_image_replayed_as_model_x_runs_it(tmp_path):
    rows = [_fwd("ttt-b16", "torch", 0.86, eager=False), _fwd("ttt-b16", "triton", 1.80, eager=False),
            _fwd("ttt-b16", "cuda", 1.09, eager=False), _fwd("ttt-b16", "triton", 0.06, batch=64, eager=False),
            _fwd("ttt-b16", "triton", 0.5, mode="pooled", eager=False),
            _fwd("ssl-l14", "torch", 0.57), _fwd("ssl-l14", "cuda", 0.65), _fwd("ssl-l14", "triton", 3.05),
            dict(_fwd("ssl-l14", "reference", 0.49))]
    notes = []
    t = measured.record([_step_file(tmp_path, "G", rows, name="forward.json", suite="forward")], notes=notes)
    fwd = t["gpus"]["G"]["forward"]
    # ttt-b16's rows have no replayed-graph timing beside them: a forward launched op by op,
    # which model(x) on a GPU does not run from its second call on, so they rank nothing
    assert set(fwd) == {"ssl-l14"} and any("ttt-b16/forward left out: launched op by op" in n for n in notes)
    assert fwd["ssl-l14"]["ms"] == {"triton": 3.05, "cuda": 0.65, "torch": 0.57}
    assert fwd["ssl-l14"]["row"] == "<table> (batch 1, grid output)" and fwd["ssl-l14"]["precision"] == "bf16"
    assert "ttt_step" not in t["gpus"]["G"]


def test_choose_follows_the_measurement_per_preset(table):
    every = ["torch", "triton", "cuda"]
    name, why = measured.choose("Fake GPU", preset("ttt-b16"), every)
    assert name == "cuda" and "ttt-b16/ttt_step on Fake GPU" in why and "cuda 1.000 ms" in why
    assert measured.choose("Fake GPU", preset("ttt-l14"), every)[0] == "triton"
    assert measured.choose("Fake GPU", preset("ttt-l14"), ["torch", "cuda"])[0] == "torch"   # triton not here
    assert measured.choose("Fake GPU", preset("ttt-l14", init_std=0.5), every)[0] == "triton"  # init: same shapes
    # not a preset: the sum over the GPU's presets (torch 6, triton 3, cuda 6)
    name, why = measured.choose("Fake GPU", preset("ttt-l14", grid=8), every)
    assert name == "triton" and why.startswith("not measured for this model (not a preset)/ttt_step on Fake GPU; "
                                               "instead the sum over the presets measured")
    name, why = measured.choose("Fake GPU", preset("ssl-l14"), every)      # a preset without a TTT step
    assert name == "triton" and why.startswith("not measured for ssl-l14/ttt_step on Fake GPU; instead")
    assert "measured fastest" not in why
    # a GPU never measured: the fixed order
    name, why = measured.choose("Other GPU", preset("ttt-b16"), every)
    assert name == measured.FALLBACK[0] and "no measurement for Other GPU" in why
    assert measured.choose("Other GPU", None, ["cuda", "torch"])[0] == "cuda"


def test_choose_reads_the_forward_for_inference_and_the_step_for_training(table):
    """The workload picks the rows: at ttt-b16 the forward's fastest (torch) is not the step's (cuda)."""
    every = ["torch", "triton", "cuda"]
    name, why = measured.choose("Fake GPU", preset("ttt-b16"), every, "forward")
    assert name == "torch"
    assert why.startswith("measured fastest for ttt-b16/forward on Fake GPU (forward: torch 0.500 ms")
    assert "batch 1, grid output" in why and "measured in bf16" in why
    assert measured.choose("Fake GPU", preset("ttt-b16"), every)[0] == "cuda"
    assert measured.choose("Fake GPU", preset("ttt-b16"), every, "ttt_step")[0] == "cuda"
    # a preset whose forward was not measured: said so, and the rule used instead
    name, why = measured.choose("Fake GPU", preset("ssl-l14"), every, "forward")
    assert name == "torch" and why.startswith("not measured for ssl-l14/forward on Fake GPU; instead the sum over "
                                              "the presets measured for forward on Fake GPU (ttt-b16)")
    assert "measured fastest" not in why
    with pytest.raises(ValueError, match="workload: expected one of"):
        measured.choose("Fake GPU", preset("ttt-b16"), every, "inference")


def test_a_workload_never_measured_on_a_gpu_falls_back_to_the_fixed_order_and_says_so(monkeypatch, tmp_path):
    rows = [_row("ttt-b16", "engine/torch", 3.0), _row("ttt-b16", "engine/triton", 2.0)]
    monkeypatch.setattr(measured, "_LOADED", measured.record([_step_file(tmp_path, "G", rows)]))
    name, why = measured.choose("G", preset("ttt-b16"), ["torch", "triton", "cuda"], "forward")
    assert name == "triton"
    assert why.startswith("not measured for ttt-b16/forward on G; instead the fixed order triton > cuda > torch")
    assert "measured fastest" not in why


def test_the_fixed_orders_agreement_is_computed_from_the_measurements(table):
    """The fallback claims only what the packaged table confirms: at the fake GPU the fixed
    order's first choice (triton) is the step's pick at ttt-l14 (not at ttt-b16) and not the
    forward's at ttt-b16."""
    every = ["torch", "triton", "cuda"]
    _, why = measured.choose("Other GPU", preset("ttt-b16"), every)
    assert "at 1 of the 2 GPU/preset pairs measured for ttt_step" in why and "agrees with it" not in why
    _, why = measured.choose("Other GPU", preset("ttt-b16"), every, "forward")
    assert "at 0 of the 1 GPU/preset pairs measured for forward" in why


def test_a_run_without_a_table_says_so_in_the_reason(monkeypatch, tmp_path):
    rows = [{"key": "latency/triton/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.493},
            {"key": "latency/cuda/graph", "preset": "ttt-l14", "status": "ok", "ms_per_step": 0.529},
            {"key": "latency/torch/graph", "preset": "ttt-l14", "status": "skipped", "reason": "excluded by --skip"}]
    monkeypatch.setattr(measured, "_LOADED", measured.record([_step_file(tmp_path, "G", rows, name="engine.json",
                                                                         suite="engine", commit="e5f03eb")]))
    name, why = measured.choose("G", preset("ttt-l14"), ["torch", "triton", "cuda"])
    assert name == "triton"
    assert "torch not measured in that run (skipped: excluded by --skip)" in why and "at e5f03eb" in why


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


def test_default_backend_on_a_gpu_uses_the_gpu_name_the_model_and_the_workload(monkeypatch, table):
    monkeypatch.setattr(backends, "_status", lambda name: (True, ""))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert backends.default_backend("cuda:0", preset("ttt-b16")) == "cuda"
    assert backends.default_backend("cuda", preset("ttt-l14")) == "triton"
    assert backends.resolve_backend(None, "cuda", preset("ttt-b16")) == "cuda"
    assert backends.resolve_backend(None, "cuda", preset("ttt-b16"), workload="forward") == "torch"
    assert backends.default_backend("cuda", preset("ttt-b16"), "forward") == "torch"
    assert backends.get_backend(None, device="cuda", config=preset("ttt-b16"), workload="forward",
                                check=False) is backends._table("torch")
    assert backends.default_backend("cpu", preset("ttt-b16")) == "torch"
    with pytest.raises(ValueError, match="workload"):
        backends.default_backend("cpu", preset("ttt-b16"), "train")
    monkeypatch.setattr(backends, "_status", lambda name: (name == "torch", "missing"))
    assert backends.default_backend("cuda", preset("ttt-b16")) == "torch"


def test_the_trainer_asks_for_the_step_and_the_models_forward_for_the_forward(monkeypatch):
    """On a GPU the trainer's default is the TTT step's fastest, ``model(x)``'s the forward's."""
    import apm_fast
    from apm_fast import model as model_module
    from apm_fast.ttt import trainer as trainer_module

    asked = []

    def spy(name, device=None, config=None, workload="ttt_step"):
        asked.append(workload)
        return "torch"

    monkeypatch.setattr(model_module, "resolve_backend", spy)
    monkeypatch.setattr(trainer_module, "resolve_backend", spy)
    cfg = apm_fast.preset("ttt-b16", grid=4, hidden=(32, 16), dim=16, heads=2)
    m = apm_fast.APM(cfg)
    with torch.no_grad():
        m(torch.randn(1, 3, cfg.image_size, cfg.image_size))
    apm_fast.TestTimeTrainer(m, steps=1)
    assert asked == ["forward", "ttt_step"]


def _simulated_info(monkeypatch, capsys, gpu):
    import types

    from apm_fast.commands import info

    monkeypatch.setattr(backends, "_status", lambda name: (True, ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=gpu, total_memory=80 * 2**30, major=9, minor=0))
    info._print_defaults(torch)
    return capsys.readouterr().out.splitlines()


def test_info_says_the_default_per_preset_and_workload_and_why(monkeypatch, capsys, table):
    out = _simulated_info(monkeypatch, capsys, "Fake GPU")
    assert out[0].startswith("default backend on cuda:0 (Fake GPU), per preset and workload")
    lines = {tuple(line.split()[:3]): line for line in out[1:]}
    assert len(lines) == 2 * len(PRESETS)
    assert "measured fastest for ttt-b16/ttt_step on Fake GPU" in lines[("ttt-b16", "ttt_step", "cuda:")]
    assert "measured fastest for ttt-b16/forward on Fake GPU" in lines[("ttt-b16", "forward", "torch:")]
    assert "not measured for ssl-l14/ttt_step on Fake GPU" in lines[("ssl-l14", "ttt_step", "triton:")]
    assert "not measured for ssl-l14/forward on Fake GPU" in lines[("ssl-l14", "forward", "torch:")]


def test_info_on_the_measured_gpus_follows_the_packaged_table(monkeypatch, capsys):
    """For every GPU of the packaged table, each preset the table measured is said to be
    measured and gets that measurement's pick; any other is said not to be measured."""
    with open(measured.PATH) as f:
        packaged = json.load(f)
    monkeypatch.setattr(measured, "_LOADED", packaged)
    for gpu, workloads in packaged["gpus"].items():
        lines = {tuple(line.split()[:2]): line.split(None, 2)[2] for line in
                 _simulated_info(monkeypatch, capsys, gpu)[1:]}
        assert len(lines) == len(measured.WORKLOADS) * len(PRESETS), lines
        for (p, workload), line in lines.items():
            entry = workloads.get(workload, {}).get(p)
            if entry is None:
                assert f"not measured for {p}/{workload} on {gpu}; instead" in line and "measured fastest" not in line
            else:
                # the pick, worked out here: the fastest, or among tables within 2 % of it the
                # first of the fixed order
                ms = entry["ms"]
                tied = [n for n in ms if ms[n] <= min(ms.values()) * 1.02]
                want = next(n for n in ("triton", "cuda", "torch") if n in tied)
                assert line.startswith(want + ": measured ")
                assert f"{entry['file']} at {entry['commit']}" in line


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
