"""The benchmark harness end to end at tiny sizes on the CPU: gate, every section, JSON, a plot;
and a broken fast path must fail the gate and remove every speedup."""
import json

import pytest
import torch

import apm_fast
from apm_fast.bench import BenchOptions, run_suite
from apm_fast.bench import cli as bench_cli
from apm_fast.bench.options import SECTIONS
from apm_fast.ops.contract import TorchPrimitives

STATUSES = {"ok", "absent", "skipped", "error"}
SECTION_FILES = {"step": "ttt_step", "throughput": "throughput", "forward": "forward",
                 "scaling": "scaling", "table4": "table4", "primitives": "primitives", "engine": "engine",
                 "distributed": "distributed", "evaluation": "evaluation", "capabilities": "capabilities"}





# Left out: torch.compile (half a minute of compilation on this CPU) and the Triton kernels, which
# run here in Triton's interpreter at ~1.5 s a step (their rows say "skipped", with the reason).
SKIP = ("compile", "triton")


def _tiny(tmp_path, **kw):
    base = dict(device="cpu", presets=("ttt-l14",), skip=SKIP, out=str(tmp_path),
                warmup=1, forward_batches=(1, 2), scaling_grids=(4, 8), tpt_views=2,
                tpt_prompts=4, t_max=3, ttt_steps=3, students_list=(2,), e2e_images=4)
    base.update(kw)
    return BenchOptions.quick_defaults(**base)


def _load(out_dir, name):
    files = list(out_dir.rglob(f"{name}-quick.json"))
    assert len(files) == 1, f"expected one {name}-quick.json under {out_dir}, found {files}"
    return json.loads(files[0].read_text())


def test_harness_end_to_end(tmp_path, one_thread, monkeypatch):
    logs = []
    result = run_suite(_tiny(tmp_path), log=logs.append)
    assert result.gate_passed, "\n".join(logs)
    machine_dir = result.out_dir
    assert machine_dir.parent == tmp_path and machine_dir.name.startswith("cpu-")

    available = apm_fast.available_backends()
    for sec in SECTIONS:
        doc = _load(tmp_path, SECTION_FILES[sec])
        assert doc["schema"] == 1 and doc["suite"] == SECTION_FILES[sec] and doc["quick"] is True
        assert doc["partial"] is False and "error" not in doc
        m = doc["machine"]
        assert m["torch"] == torch.__version__ and m["device"] == "cpu" and m["commit"]
        assert "torch " + torch.__version__ in doc["machine_line"]
        assert doc["gate"]["passed"] is True and doc["gate"]["checks"]
        assert all(c["passed"] for c in doc["gate"]["checks"])
        assert doc["speedups_suppressed"] is None
        assert doc["rows"] and all(r["status"] in STATUSES for r in doc["rows"])
        assert not [r for r in doc["rows"] if r["status"] == "error"], doc["rows"]
        # backends that are not there are listed with the registry's reason, never dropped
        for name in ("triton", "cuda"):
            status = doc["backends"][name]
            assert status != "available" or available.get(name) == "available"
            if name in available:
                assert status == available[name]

    steps = {r["key"]: r for r in _load(tmp_path, "ttt_step")["rows"]}
    for key in ("authors", "eager", "torch"):
        r = steps[key]
        assert r["status"] == "ok" and r["gate"] == "passed"
        t = r["timing"]
        assert t["repeats"] >= 20 and len(t["samples_ms"]) == t["repeats"]
        assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(steps["eager"]["timing"]["median_ms"] / t["median_ms"])
    assert steps["authors"]["label"] == "authors-style (re-implemented)"
    assert steps["authors"]["describe"]["copies"] == 8 and steps["authors"]["describe"]["chunk"] == 16
    assert steps["compile"]["status"] == "skipped"
    assert steps["torch+graph"]["status"] == "absent" and "CUDA" in steps["torch+graph"]["reason"]
    assert steps["engine/torch"]["status"] == "absent" and "CUDA" in steps["engine/torch"]["reason"]
    for name in ("triton", "cuda"):
        expected = "skipped" if available.get(name) == "available" else "absent"
        assert steps[name]["status"] == expected and steps[name]["reason"]
        if expected == "absent":
            assert steps[name]["reason"] == available.get(name, steps[name]["reason"])

    gate_paths = {(c["path"], c["check"]) for c in _load(tmp_path, "gate")["gate"]["checks"]}
    assert {("torch", "forward.cls"), ("torch", "grad"), ("authors", "step.update"),
            ("eager", "step.grad")} <= gate_paths

    through = {r["key"]: r for r in _load(tmp_path, "throughput")["rows"]}
    for key in ("alone/reference", "alone/torch", "side-by-side/torch/S=2", "end-to-end/torch"):
        assert through[key]["status"] == "ok" and through[key]["images_per_s"] > 0, key
    side = through["side-by-side/torch/S=2"]
    assert side["reset_ms"] > 0 and 0 < side["reset_share"] < 1      # a part of each batch
    half = through["side-by-side/torch/S=2/bf16-moments"]
    assert half["status"] == "ok" and half["moments"] == "bf16" and through["side-by-side/torch/S=2"]["moments"] == "fp32"
    assert 0 < half["cls_rel_vs_fp32_moments"] < 5e-2 and 0 <= half["closest_changed"] <= 1
    prims = [r for r in _load(tmp_path, "primitives")["rows"] if r["backend"] == "torch"]
    assert len(prims) >= 10 and all(r["status"] == "ok" and r["rel_err"] in (0.0, None) for r in prims)
    engine = {r["key"]: r for r in _load(tmp_path, "engine")["rows"]}
    assert engine["gate/torch"]["passed"] is True and engine["memory/torch"]["state_bytes_per_param"] >= 16
    floor, lat = engine["floor"], engine["latency/torch/eager"]
    step = engine["profile/torch/S=1"]["step"]           # one step's ops in the order they started
    starts = [e["start_us"] for e in step["timeline"]]
    assert step["kernels"] == len(starts) > 10 and starts == sorted(starts) and starts[0] == 0
    assert step["sum_us"] == pytest.approx(sum(e["us"] for e in step["timeline"]))
    assert 0 < step["span_us"] and any("mm" in e["kernel"] for e in step["timeline"])
    assert floor["status"] == "ok" and floor["gemm_tflops"] > 0 and floor["copy_gbps"] > 0
    assert floor["adam_bytes"] == floor["adam_bytes_per_param"] * engine["memory/torch"]["params"]
    assert floor["floor_ms"] == pytest.approx(floor["compute_ms"] + floor["adam_ms"])
    assert lat["vs_floor"] == pytest.approx(lat["ms_per_step"] / floor["floor_ms"])
    dist = _load(tmp_path, "distributed")["rows"]
    assert dist[0]["status"] == "absent" and "torchrun" in dist[0]["reason"]

    scaling = _load(tmp_path, "scaling")["rows"]
    assert {(r["model"], r["queries"]) for r in scaling if r["status"] == "ok"} == \
        {("apm", 16), ("apm", 64), ("clip", 16), ("clip", 64)}
    t4 = _load(tmp_path, "table4")
    roles = {r["role"] for r in t4["rows"] if r["status"] == "ok"}
    assert roles == {"student", "teacher", "tpt"}
    student = next(r for r in t4["rows"] if r["role"] == "student")
    by_t = student["flops"]["rewritten"]["analytic"]["by_t"]
    assert len(by_t) == 3 and by_t[2] - by_t[1] == by_t[1] - by_t[0] > 0   # linear in t
    # counter ~ formula: at one image the driver's rank-one products over B = 1 (dW_T, dW_O, dW_V)
    # are element-wise work that the counter does not count (exact at B = 2: test_bench_units)
    assert student["flops"]["rewritten"]["measured"]["by_t"] == pytest.approx(by_t, rel=1e-2)

    # FLOPs say how they are counted (1 multiply-add = 2 FLOPs): in every JSON file that holds
    # them, and on the plot that shows them; memory is plotted in MiB
    for name in ("ttt_step", "forward", "scaling", "table4", "engine", "primitives"):
        assert _load(tmp_path, name)["flops_convention"] == "1 multiply-add = 2 FLOPs", name
    assert "flops_convention" not in _load(tmp_path, "gate")
    assert all(r["timing_mode"] == "eager" for r in scaling if r["status"] == "ok")
    from apm_fast.bench import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, doc, path, layout=True: figures.append(fig))
    plots.plot_table4(t4, tmp_path / "t4.png")
    plots.plot_scaling(_load(tmp_path, "scaling"), tmp_path / "sc.png")
    labels = [t for fig in figures for ax in fig.axes for t in (ax.get_ylabel(), ax.get_title())]
    assert "FLOPs per image (1 multiply-add = 2 FLOPs)" in labels
    assert any("1 multiply-add = 2 FLOPs" in t and "Table 4" in t for t in labels)
    assert "peak memory (MiB = 2^20 B, weights included)" in labels

    pngs = {p.name for p in result.plots}
    assert {"ttt_step-quick.png", "scaling-quick.png", "table4-quick.png"} <= pngs
    for p in result.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_broken_fast_path_fails_the_gate_and_suppresses_speedups(tmp_path, monkeypatch, one_thread,
                                                                 capsys):
    honest = TorchPrimitives._pool_fwd

    def broken(self, f, pos_out, kt, scale):              # a pool that weighs the cells wrong
        sbar, lse = honest(self, f, pos_out, kt, scale)
        return sbar * 1.5, lse

    monkeypatch.setattr(TorchPrimitives, "_pool_fwd", broken)
    status = bench_cli.main(["--device", "cpu", "--quick", "--preset", "ttt-l14", "--only", "step",
                             "forward", "--skip", *SKIP, "authors", "--out", str(tmp_path),
                             "--warmup", "1", "--no-plots"])
    assert status == 1                                  # the gate's verdict is the exit status
    printed = capsys.readouterr().out
    assert "correctness gate: FAILED" in printed and "SPEEDUPS SUPPRESSED" in printed
    for name in ("ttt_step", "forward"):
        doc = _load(tmp_path, name)
        assert doc["gate"]["passed"] is False
        assert any(f.endswith("/torch") for f in doc["gate"]["failed"])
        assert "gate failed" in doc["speedups_suppressed"]
        ok = [r for r in doc["rows"] if r["status"] == "ok"]
        assert ok, "timings are still recorded"
        for r in ok:
            for k in ("speedup_vs_eager", "speedup_vs_authors", "speedup_vs_reference"):
                assert r.get(k) is None
    steps = {r["key"]: r for r in _load(tmp_path, "ttt_step")["rows"]}
    assert steps["torch"]["gate"] == "failed" and steps["eager"]["gate"] == "passed"


def test_one_setting_in_turns(tmp_path, one_thread, capsys):
    """``--ab SETTING=V1,V2``: the ab section alone (after the gate), every value on every kernel
    table and S of --students-list in turns, each row saying what the program resolved the setting
    to and that the values train the same; one summary row per value against the first; a plot.
    A setting that is not the engine's, or one value, is refused with the argument named."""
    status = bench_cli.main(["--device", "cpu", "--quick", "--preset", "ttt-l14", "--skip", *SKIP, "--out",
                             str(tmp_path), "--ab", "pool_factors=true,false", "--ab-turns", "2",
                             "--students-list", "1", "2"])
    assert status == 0
    doc = _load(tmp_path, "ab")
    assert doc["gate"]["passed"] is True
    assert not list(tmp_path.rglob("engine-quick.json")), "only the ab section runs"
    turns = [r for r in doc["rows"] if "turn" in r and r["backend"] == "torch"]
    assert sorted((r["turn"], r["students"], r["value"]) for r in turns) == sorted(
        (t, s, v) for t in (0, 1) for s in (1, 2) for v in ("true", "false"))
    assert all(r["status"] == "ok" and r["ms_per_step"] > 0 and r["resolved"] == r["value"] for r in turns)
    for s in (1, 2):             # the same training either way (float32 on the CPU)
        losses = {r["value"]: r["loss_last_mean"] for r in turns if r["students"] == s and r["turn"] == 0}
        assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    summary = {r["key"]: r for r in doc["rows"] if "turn" not in r and r["backend"] == "torch"}
    assert sorted(summary) == sorted(f"ab/torch/S={s}/pool_factors={v}" for s in (1, 2) for v in ("true", "false"))
    for s in (1, 2):
        first, other = summary[f"ab/torch/S={s}/pool_factors=true"], summary[f"ab/torch/S={s}/pool_factors=false"]
        assert first["vs_first"] == 1.0 and first["turns"] == 2
        assert other["vs_first"] == pytest.approx(other["ms_per_step"] / first["ms_per_step"])
    assert list(tmp_path.rglob("ab-quick.png"))
    for bad in ("pool=true,false", "pool_factors=true", "pool_factors=true,maybe"):
        assert bench_cli.main(["--device", "cpu", "--quick", "--no-out", "--ab", bad]) == 2
        assert "--ab: expected" in capsys.readouterr().err
