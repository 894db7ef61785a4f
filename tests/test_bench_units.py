"""The benchmark's building blocks: statistics, FLOP formulas, the gate's metric, new tables."""
import math

import pytest
import torch
import torch.nn.functional as F

import apm_fast
from apm_fast.bench.flops import apm_flops, count_flops
from apm_fast.bench.steps import forward_fn
from apm_fast.bench.gate import relative_error
from apm_fast.bench.timing import measure, quantile, summarize


def test_quantile_interpolates_and_checks_input():
    assert quantile([3, 1, 2], 0.5) == 2
    assert quantile([0, 10], 0.2) == pytest.approx(2.0)
    assert quantile([5], 0.8) == 5
    with pytest.raises(ValueError, match="at least one"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match="q in"):
        quantile([1], 1.5)


def test_measure_needs_20_repeats_and_orders_its_percentiles():
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=5)
    calls = []
    t = measure(lambda: calls.append(1), warmup=2, repeats=20)
    assert len(calls) == 22 and t.repeats == 20 and len(t.samples_ms) == 20
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.clock == "perf_counter"
    s = summarize(list(range(1, 21)), clock="x")
    assert s.median_ms == pytest.approx(10.5) and s.min_ms == 1


def test_relative_error():
    a = torch.tensor([1.0, 2.0, 2.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(a * 1.5, a) == pytest.approx(0.5)
    assert relative_error(torch.tensor([float("nan"), 0, 0]), a) == math.inf
    assert relative_error(a[:2], a) == math.inf
    assert relative_error(None, a) == math.inf


@pytest.mark.parametrize("name,overrides", [
    ("ttt-l14", dict(grid=6, patch=3, hidden=(40, 24, 12), dim=48)),
    ("ttt-b16", dict(grid=5, patch=2, hidden=(30,), dim=16, heads=4)),
    ("ssl-l14", dict(grid=4, patch=2, hidden=(20, 20, 12), dim=24)),
])
def test_analytic_flops_equal_the_flop_counter(name, overrides):
    """The analytic formulas, term by term, against FlopCounterMode on shape-only (meta) tensors,
    where every matmul, the attention kernel included, is visible to the counter."""
    cfg = apm_fast.preset(name, **overrides)
    with torch.device("meta"):
        m = apm_fast.APM(cfg)
    x = torch.empty(2, 3, cfg.image_size, cfg.image_size, device="meta")
    for form, backend in (("plain", "reference"), ("rewritten", "torch")):
        fwd = forward_fn(backend, "meta")
        a = apm_flops(cfg, form=form, batch=2, want_rgb=False)
        assert count_flops(lambda: fwd(m, x, want_grid=True)) == a["forward"], form
        if cfg.pool:
            def step():
                z = fwd(m, x, want_grid=False)[0]
                F.mse_loss(z, torch.zeros_like(z)).backward()
            assert count_flops(step) == a["step"], form


def test_analytic_flops_match_the_spec_for_ttt_l14():
    cfg = apm_fast.preset("ttt-l14")
    plain, rew = apm_flops(cfg, form="plain"), apm_flops(cfg, form="rewritten")
    assert plain["forward"] / 1e9 == pytest.approx(42.7, abs=0.05)
    assert plain["step"] / 1e9 == pytest.approx(128.1, abs=0.05)
    assert rew["forward"] / 1e9 == pytest.approx(31.7, abs=0.05)
    assert rew["step"] / 1e9 == pytest.approx(86.5, abs=0.1)
    with pytest.raises(ValueError, match="form"):
        apm_flops(cfg, form="fused")


# ---------------------------------------------------------------------- picking up new paths
def _quick_ctx(**kw):
    from apm_fast.bench.context import Context
    from apm_fast.bench.options import BenchOptions

    base = dict(device="cpu", presets=("ttt-b16",), out=None, plots=False, ttt_steps=1,
                skip=("triton",))
    base.update(kw)
    return Context(BenchOptions.quick_defaults(**base), log=lambda s: None)





def test_the_primitives_adam_rows_time_a_later_update_of_their_parameters():
    """The primitives section's Adam rows (the flat buffers with the compute copy; the trigger
    columns from their factors) each time an update after the first (at step 1 the kernel tables
    read no moments, fewer bytes than the rows are rated by), and each moves its parameters: the
    flat row every one, the trigger row its block of columns and nothing else."""
    from apm_fast import preset
    from apm_fast.bench.sections.primitives import _adam_cases
    from apm_fast.ops.contract import TorchPrimitives
    from apm_fast.ttt.memory import count_params

    cfg = preset("ttt-l14", grid=4, patch=2, hidden=(18, 10), dim=12, heads=3)

    class Recording(TorchPrimitives):                      # the update numbers every row times
        steps = []

        def _adam_(self, params, grads, exp_avg, exp_avg_sq, step, *rest):
            self.steps.append(float(step))
            return super()._adam_(params, grads, exp_avg, exp_avg_sq, step, *rest)

    moved = {}
    for name, _, _, call, _ in _adam_cases(cfg, "cpu", torch.bfloat16):
        torch.manual_seed(0)
        p0 = torch.randn(1, count_params(cfg))             # the cases' parameters before any update
        torch.manual_seed(0)
        cases = {n: c for n, _, _, c, _ in _adam_cases(cfg, "cpu", torch.bfloat16)}
        moved[name] = cases[name](Recording()) != p0
    assert sorted(moved) == ["adam_ (flat, + compute copy)", "adam_ (trigger columns from factors)"]
    assert len(Recording.steps) == 2 and min(Recording.steps) > 1
    assert bool(moved["adam_ (flat, + compute copy)"].all())
    rows, d = cfg.hidden[0], cfg.pos_dim
    block = torch.zeros_like(moved["adam_ (trigger columns from factors)"])
    block[:, :rows * 2 * d].view(rows, 2 * d)[:, :d] = True
    assert torch.equal(moved["adam_ (trigger columns from factors)"], block)


def test_a_new_table_is_picked_up(monkeypatch, one_thread):
    """A table is one entry of backends.TABLES: absent with its reason while it cannot run, then
    in every section's rows (eager, graph, engine; one image at a time, side by side)."""
    from apm_fast import backends
    from apm_fast.bench.sections import step, throughput
    from apm_fast.ops.contract import TorchPrimitives

    class Late(TorchPrimitives):
        name = "late"
        ready = False

        def available(self):
            return (True, "") if self.ready else (False, "needs the late extension (build it)")

    monkeypatch.setitem(backends.TABLES, "late", Late)
    monkeypatch.setattr(backends, "_MADE", {})
    ctx = _quick_ctx()
    assert ctx.backends["late"] == "needs the late extension (build it)"
    rows = {c.key: c for c in step.candidates(ctx, "ttt-b16")}
    assert rows["late"].status == "absent" and "late extension" in rows["late"].reason
    assert rows["late+graph"].status == "absent" and rows["engine/late"].status == "absent"
    monkeypatch.setattr(Late, "ready", True)                       # now it can run
    ctx = _quick_ctx(sections=("throughput",), skip=("triton", "reference", "torch"), students_list=(2,),
                     e2e_images=0)
    rows = {c.key: c for c in step.candidates(ctx, "ttt-b16")}
    assert rows["late"].status == "ok" and rows["late"].factory is not None
    rows = {r["key"]: r for r in throughput.run(ctx)["rows"]}
    assert rows["alone/late"]["status"] == "ok", rows["alone/late"]["reason"]
    assert rows["alone/torch"]["status"] == "skipped"
    side = rows["side-by-side/late/S=2"]
    assert side["status"] == "ok" and side["images_per_s"] > 0 and side["students"] == 2


def test_the_engine_section_times_the_plain_step_at_every_ttt_preset_of_the_run():
    """Beside the engine preset's rows, one latency row per table at each other TTT preset of the
    run (its own model: the TFLOP/s differ), each row naming its preset; the floor's ratios only
    on the engine preset's rows (the floor is its)."""
    from apm_fast.bench.sections import engine

    ctx = _quick_ctx(presets=("ttt-b16", "ttt-l14", "ssl-l14"), skip=("triton", "gate/torch", "memory/torch",
                                                                    "profile/*"))   # a pattern too
    rows = engine.run(ctx)["rows"]
    assert all(r["preset"] for r in rows)
    lat = {r["preset"]: r for r in rows if r["key"] == "latency/torch/eager"}
    assert sorted(lat) == ["ttt-b16", "ttt-l14"]                  # ssl-l14 has no pool: not a TTT preset
    assert all(r["status"] == "ok" and r["ms_per_step"] > 0 for r in lat.values())
    assert lat["ttt-b16"]["tflops"] != lat["ttt-l14"]["tflops"]
    assert "vs_floor" in lat["ttt-l14"] and "vs_floor" not in lat["ttt-b16"]
    assert {r["preset"] for r in rows if r["key"] == "latency/triton/eager"} == {"ttt-b16", "ttt-l14"}
    assert all(r["status"] == "skipped" for r in rows if r["backend"] == "triton")
    profiles = [r["status"] for r in rows if r["key"].startswith("profile/torch/")]
    assert profiles and set(profiles) == {"skipped"}
    # --engine-presets: those presets' rows, whatever the run's presets (the targets run's ttt-l14)
    ctx = _quick_ctx(presets=("ttt-l14",), engine_presets=("ttt-h14",), skip=ctx.options.skip)
    assert {r["preset"] for r in engine.run(ctx)["rows"] if r["key"] == "latency/torch/eager"} == {"ttt-l14", "ttt-h14"}
    with pytest.raises(ValueError, match="engine_presets: \\['ssl-l14'\\] are not TTT presets"):
        _quick_ctx(engine_presets=("ssl-l14",))
    # counts and lists refused by name before anything runs (the Python API; the command line's
    # argument types refuse them earlier)
    for kw, message in [({"students_list": (1, 0)}, "students_list: expected positive integers, got \\[1, 0\\]"),
                        ({"scaling_grids": ()}, "scaling_grids: expected positive integers"),
                        ({"e2e_images": -1}, "e2e_images: expected a non-negative integer, got -1"),
                        ({"warmup": 1.5}, "warmup: expected a non-negative integer")]:
        with pytest.raises(ValueError, match=message):
            _quick_ctx(**kw)
    assert _quick_ctx(e2e_images=0, warmup=0).options.e2e_images == 0


def test_skip_takes_keys_and_shell_patterns():
    ctx = _quick_ctx(skip=("triton", "latency/*/graph/*", "side-by-side/cuda/S=[0-9]*"))
    assert ctx.skipped("triton") and not ctx.skipped("tri") and not ctx.skipped("torch")
    assert ctx.skipped("latency/cuda/graph/one-stream") and not ctx.skipped("latency/cuda/graph")
    assert ctx.skipped("side-by-side/cuda/S=64") and not ctx.skipped("side-by-side/triton/S=64")


def test_time_budget_marks_what_did_not_start():
    from apm_fast.bench.sections import step

    ctx = _quick_ctx(time_budget_s=0.0)
    rows = step.run(ctx)["rows"]
    assert rows and all(r["status"] in ("skipped", "absent") for r in rows)
    assert any("time budget" in r["reason"] for r in rows)


def test_targets_are_read_from_the_sections_rows_and_judged():
    """targets.json: each value from its section's row (the fastest side-by-side table at S = 64),
    null with the reason where a row is missing or failed, and each target judged met or not."""
    from apm_fast.bench.targets import collect, markdown

    ok = dict(status="ok", preset="ttt-l14")
    results = {
        "engine": {"rows": [dict(ok, key="latency/triton/graph", ms_per_step=0.5, precision="bf16", moments="fp32"),
                            dict(ok, key="latency/cuda/graph", ms_per_step=0.25),
                            dict(key="latency/torch/graph", status="error", reason="boom")]},
        "throughput": {"rows": [dict(ok, key="side-by-side/triton/S=64", images_per_s=130.0),
                                dict(ok, key="side-by-side/cuda/S=64", images_per_s=230.0),
                                dict(ok, key="side-by-side/cuda/S=64/bf16-moments", images_per_s=290.0),
                                dict(ok, key="end-to-end/cuda", images_per_s_after_first_batch=210.0)]},
        "scaling": {"rows": [dict(status="ok", model="apm", queries=50176, timing={"median_ms": 11.0},
                                  peak_bytes=340 * 2 ** 20, first_call_peak_bytes=500 * 2 ** 20),
                             dict(status="ok", model="clip", queries=50176, timing={"median_ms": 1.0},
                                  peak_bytes=1)]},
    }
    doc = collect(results, True, "abc1234", "machine")
    assert doc["side_by_side_table"] == "cuda"
    assert (doc["step_ms_triton"], doc["step_ms_cuda"], doc["side_by_side_img_s"]) == (0.5, 0.25, 230.0)
    assert doc["side_by_side_img_s_bf16_moments"] == 290.0 and doc["end_to_end_img_s_l14"] == 210.0
    # the target is stated in MB (1e6 B): 340 MiB is 356.5 MB, over "<= 350 MB"
    assert doc["scaling_50176_ms"] == 11.0 and doc["scaling_50176_mb"] == pytest.approx(340 * 2 ** 20 / 1e6)
    assert doc["scaling_50176_mib"] == 340.0
    assert doc["scaling_50176_first_call_mb"] == pytest.approx(500 * 2 ** 20 / 1e6)
    assert doc["scaling_50176_first_call_mib"] == 500.0
    assert doc["step_ms_torch"] is None and "boom" in doc["missing"]["step_ms_torch"]
    assert doc["step_ms_eager"] is None and "ttt_step" in doc["missing"]["step_ms_eager"]
    assert doc["met"] == {"step_ms_triton": False, "side_by_side_img_s": True,
                          "side_by_side_img_s_bf16_moments": False, "end_to_end_img_s_l14": True,
                          "scaling_50176_ms": True, "scaling_50176_mb": False}
    assert doc["commit"] == "abc1234" and doc["gate_passed"] is True
    assert doc["precision"].startswith("bf16 GEMMs, fp32 master weights, fp32 Adam moments")
    md = markdown(doc)
    assert "| 64 students side by side, fp32 moments (images/s) | 230.0 | >= 220 | yes |" in md
    assert "(MB = 1e6 B) | 356.5 | <= 350 | no |" in md and "| same, in MiB (2^20 B) | 340.0 |  |  |" in md
    assert "not measured" in md
    failed = collect(results, False, "abc1234", "machine")     # a run whose gate failed meets nothing
    assert failed["gate_passed"] is False and not any(failed["met"].values())
    assert failed["side_by_side_img_s"] == 230.0               # the numbers are still shown


@pytest.mark.parametrize("argv, message", [
    (["--time-budget", "-5"], "--time-budget: expected a positive finite number, got '-5'"),
    (["--time-budget", "nan"], "--time-budget: expected a positive finite number, got 'nan'"),
    (["--authors-presets", "bogus"], "--authors-presets: expected one of"),
    (["--compile-presets", "ssl-l14x"], "--compile-presets: expected one of"),
    (["--device", "foo"], "bench: --device: expected cpu, cuda or cuda:N, got 'foo'"),
    (["--tpt-towers", "NotAModel"], "bench: --tpt-towers: expected open_clip model names (`apm-fast info "
                                    "--teachers` lists them), got unknown ['NotAModel']"),
    (["--tpt-towers", "ViT-B-16", "ViT-B/1"], "got unknown ['ViT-B/1']; close matches: ['ViT-B-16'"),
])
def test_bench_refuses_bad_options_with_exit_status_2(argv, message, capsys):
    """Refused as the command line is read (or before the suite starts), named, exit status 2:
    not a run of every section marked skipped, nor an internal error."""
    from apm_fast.bench import cli as bench_cli

    with pytest.raises(SystemExit) as info:
        code = bench_cli.main(["--quick", "--no-out", *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_options_refuse_unknown_presets_and_budgets_for_python_callers():
    from apm_fast.bench.options import BenchOptions

    with pytest.raises(ValueError, match=r"authors_presets: unknown \['bogus'\]"):
        BenchOptions(authors_presets=("bogus",))
    with pytest.raises(ValueError, match=r"compile_presets: unknown \['x'\]"):
        BenchOptions(compile_presets=("x",))
    for bad in (-5, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="time_budget_s: expected a finite number of seconds >= 0"):
            BenchOptions(time_budget_s=bad)


def test_bench_plot_skips_json_files_that_are_not_results_and_takes_one_file(tmp_path, capsys):
    """A folder's JSON files that are not results documents (a list, an object without "suite",
    a torn write) are skipped with one warning line each, counted at the end, and the others are
    drawn; one results file can be named instead of a folder; a folder with no results document
    at all, or one named file that is not one, is an error (exit status 2)."""
    import json

    from apm_fast.bench import plots

    (tmp_path / "sub").mkdir()
    (tmp_path / "gate.json").write_text('{"suite": "gate"}')
    (tmp_path / "targets.json").write_text('{"commit": "x", "gate_passed": true, "missing": {}, "met": {}}')
    (tmp_path / "torn.json").write_text('{"suite": "scal')
    (tmp_path / "profile.json").write_text('[1, 2]')
    (tmp_path / "sub" / "other.json").write_text('{"label": "a tool of its own"}')
    step = {"suite": "ttt_step", "machine_line": "m", "rows": [
        {"preset": "ttt-l14", "key": "eager", "label": "eager", "status": "ok",
         "timing": {"median_ms": 2.0, "p20_ms": 1.5, "p80_ms": 2.5}}]}
    (tmp_path / "sub" / "ttt_step.json").write_text(json.dumps(step))
    (tmp_path / "sub" / "scaling.json").write_text(json.dumps(       # a results file lacking a field drawn
        {"suite": "scaling", "rows": [{"model": "apm", "queries": 16, "grid": 4, "status": "ok", "label": "x",
                                       "timing": {"median_ms": 1}}]}))
    out = tmp_path / "png"
    assert plots.main([str(tmp_path), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out.split() == [str(out / "sub" / "ttt_step.png")]
    warned = [line for line in cap.err.splitlines() if line.startswith("bench-plot: skipped ")]
    assert len(warned) == 4
    assert any("scaling.json: a 'scaling' results file the plot cannot read (KeyError: 'p20_ms')" in line
               for line in warned)
    assert any("torn.json: not a results JSON file (" in line for line in warned)
    assert any("profile.json: not a results JSON file (a list, not an object)" in line for line in warned)
    assert any('other.json: not a results JSON file (an object without a "suite" key)' in line for line in warned)
    assert "bench-plot: 1 plots written; 4 JSON files skipped (named above)" in cap.err
    assert not (out / "sub" / "scaling.png").exists()
    # one results file
    assert plots.main([str(tmp_path / "sub" / "ttt_step.json"), "--out", str(tmp_path / "one")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "one" / "ttt_step.png")]
    # one file that is not a results document, and a folder without any: errors
    assert plots.main([str(tmp_path / "profile.json")]) == 2
    assert capsys.readouterr().err == (f"bench-plot: results directory: expected a folder or one results JSON "
                                       f"file, got {tmp_path / 'profile.json'}: not a results JSON file (a list, "
                                       "not an object)\n")
    assert plots.main([str(tmp_path / "sub" / "scaling.json")]) == 2
    assert "the plot cannot read" in capsys.readouterr().err
    for f in ("gate.json", "targets.json", "sub/ttt_step.json", "sub/scaling.json"):
        (tmp_path / f).unlink()
    assert plots.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"expected results JSON files under {tmp_path}, found none (3 other JSON files skipped)" in err


def test_a_failed_or_broken_engine_gate_fails_the_run_and_cannot_be_skipped_alone(monkeypatch):
    """The engine's gate feeds the run's gate: a check over its bound, or an exception while it
    runs, makes the run's gate fail (no target can then be met); --skip 'gate/*' does not drop it
    (only skipping the backend itself does, with all its rows)."""
    from apm_fast.bench.sections import engine

    ctx = _quick_ctx(skip=("triton", "gate/*"))
    row = ctx.row({"key": "gate/torch", "backend": "torch"}, "available", "torch", lambda: engine._gate(ctx, "torch"))
    assert row["status"] == "ok" and ctx.gate.passed
    assert {c.check for c in ctx.gate.checks} == {"fp32_vs_reference"}

    ctx = _quick_ctx()
    monkeypatch.setattr(engine, "_rel", lambda a, b: 0.5)          # every engine check far off
    row = ctx.row({"key": "gate/torch", "backend": "torch"}, "available", "torch", lambda: engine._gate(ctx, "torch"))
    assert row["status"] == "error" and not ctx.gate.passed
    assert ctx.gate.failed_paths() == ["engine/engine/torch"] and not ctx.gate.errors

    ctx = _quick_ctx()
    def broken(*a):
        raise RuntimeError("the engine crashed")
    monkeypatch.setattr(engine, "_gate_checks", broken)
    ctx.row({"key": "gate/torch", "backend": "torch"}, "available", "torch", lambda: engine._gate(ctx, "torch"))
    assert not ctx.gate.passed and "the engine crashed" in ctx.gate.errors[0]["error"]


def test_the_primitives_adam_rows_are_checked_against_the_plain_tables_update():
    """Each Adam row's check is the step one update takes (the buffers put back): the plain
    table's own is exact, an update 10 % too large or with the wrong first moment is caught."""
    from apm_fast.bench.gate import relative_error
    from apm_fast.bench.sections import primitives as P

    cfg = apm_fast.preset("ttt-b16", grid=4, hidden=(64, 32), dim=32, heads=4)

    class Off:
        def __init__(self, lr=1.0, beta1=1.0):
            self.lr, self.beta1 = lr, beta1

        def adam_(self, p, g, m, v, step, lr, b1, b2, eps, **kw):
            P._ORACLE.adam_(p, g, m, v, step, lr * self.lr, b1 * self.beta1, b2, eps, **kw)

    for name, work, unit, call, check in P._adam_cases(cfg, torch.device("cpu"), torch.bfloat16):
        want = check(P._ORACLE)
        assert want.abs().max() > 0 and relative_error(check(P._ORACLE), want) == 0.0, name
        assert relative_error(check(Off(lr=1.1)), want) > P._TOL[torch.bfloat16], name
        assert relative_error(check(Off(beta1=0.5)), want) > P._TOL[torch.bfloat16], name


def test_the_capabilities_speedup_over_the_authors_loop_is_kept_only_after_a_passed_gate():
    from apm_fast.bench.gate import GateReport
    from apm_fast.bench.report import finalize

    def rows():
        return {"rows": [dict(key="distill/teacher", backend="teacher", status="ok", median_ms=30.0),
                         dict(key="distill/reference", backend="reference", status="ok", median_ms=60.0),
                         dict(key="distill/torch", backend="torch", status="ok", median_ms=20.0, speedup_vs_authors=9.0)]}

    passed, failed = GateReport(), GateReport()
    passed.add("ttt-l14", "torch", "cls", "fp32", 0.0, 1e-3)
    failed.add("ttt-l14", "torch", "cls", "fp32", 1.0, 1e-3)
    ok = {r["key"]: r for r in finalize("capabilities", rows(), passed)["rows"]}
    assert ok["distill/torch"]["speedup_vs_authors"] == 3.0 and "speedup_vs_authors" not in ok["distill/teacher"]
    bad = {r["key"]: r for r in finalize("capabilities", rows(), failed)["rows"]}
    assert bad["distill/torch"]["speedup_vs_authors"] is None


def test_the_scaling_speedup_divides_only_rows_timed_the_same_way():
    """APM vs CLIP: a replayed graph against eager calls would measure the host's launches, so
    such a pair gets no speedup, and the row says why."""
    from apm_fast.bench.gate import GateReport
    from apm_fast.bench.report import finalize, format_section

    def row(model, grid, ms, mode, **kw):
        return dict(model=model, grid=grid, queries=grid * grid, status="ok", timing_mode=mode,
                    timing={"median_ms": ms, "p20_ms": ms, "p80_ms": ms}, **kw)

    result = {"rows": [row("apm", 7, 1.0, "eager", timing_mode_reason="49 queries: fewer than two full chunks"),
                       row("clip", 7, 4.0, "graph"),
                       row("apm", 224, 2.0, "graph"), row("clip", 224, 8.0, "graph")]}
    gate = GateReport()
    gate.add("ttt-b16", "scaling/torch/G=7", "chunked_forward_vs_float64", "fp32", 0.0, 1e-5)
    rows = finalize("scaling", result, gate)["rows"]
    assert rows[2]["speedup_vs_clip"] == 4.0 and "speedup_vs_clip_omitted" not in rows[2]
    assert rows[0]["speedup_vs_clip"] is None
    assert rows[0]["speedup_vs_clip_omitted"] == ("APM timed eager, CLIP graph: not comparable "
                                                  "(49 queries: fewer than two full chunks)")
    table = "\n".join(format_section("scaling", result))
    assert "timed" in table and "not comparable" in table
    rows[1]["timing_mode"] = "eager"                         # the same way: divided
    assert finalize("scaling", result, gate)["rows"][0]["speedup_vs_clip"] == 4.0
    assert "speedup_vs_clip_omitted" not in rows[0]


def test_the_scaling_section_says_how_each_point_was_timed_and_times_clip_as_the_apm(monkeypatch):
    """Every row (APM and CLIP) has its timing mode: on the CPU both eager, with the reason. The
    CLIP point asked for a graph goes through the engine's capture (measure_graph, once, replays
    timed by measure) and records a fallback to eager."""
    from apm_fast.bench.sections import scaling
    from apm_fast.bench.timing import Timing

    ctx = _quick_ctx(sections=("scaling",), scaling_grids=(4,))
    rows = scaling.run(ctx)["rows"]
    assert [(r["model"], r["status"], r["timing_mode"]) for r in rows] == [("apm", "ok", "eager"),
                                                                          ("clip", "ok", "eager")]
    assert all(r["timing_mode_reason"] == "no CUDA graphs on cpu" for r in rows)

    calls = []

    def fake_graph(fn, *, device, inner, warmup, repeats, key):
        fn()
        calls.append((inner, warmup, repeats, key))
        return Timing(1.0, 1.0, 1.0, 1.0, 1.0, repeats, warmup, "cuda-graph replay of 1 call")

    monkeypatch.setattr(scaling, "measure_graph", fake_graph)
    point = scaling._clip_point(ctx, 4, 8, graph=True)
    assert point["timing_mode"] == "graph" and "timing_mode_reason" not in point
    assert calls == [(1, ctx.options.warmup, ctx.options.repeats, "scaling/clip/ViT-B-16/G=4")]

    def failed(fn, **kw):
        return Timing(1.0, 1.0, 1.0, 1.0, 1.0, 20, 1, "perf_counter", fallback="capture failed: boom")

    monkeypatch.setattr(scaling, "measure_graph", failed)
    point = scaling._clip_point(ctx, 4, 8, graph=True)
    assert point["timing_mode"] == "eager"
    assert point["timing_mode_reason"] == "capture failed: boom" and point["timing"]["fallback"] == "capture failed: boom"


def test_measure_graph_records_why_a_capture_fell_back_and_still_warns(monkeypatch):
    """Where the capture fails on a GPU, the calls are timed eagerly, the Timing says so
    (mode "eager", ``fallback`` with the capture's warning) and the warning still reaches the user."""
    import warnings

    from apm_fast.bench import timing
    from apm_fast.ttt import graph

    def no_capture(phases, reset, device, *, warmup, key):
        warnings.warn(f"apm_fast.engine: CUDA graph capture failed for {key} (RuntimeError: boom)", RuntimeWarning)
        return None

    monkeypatch.setattr(graph, "capture_phases", no_capture)
    monkeypatch.setattr(timing, "_is_cuda", lambda device: True)
    monkeypatch.setattr(timing, "measure", lambda fn, **kw: timing.summarize([1.0] * 20, clock="cuda-events"))
    with pytest.warns(RuntimeWarning, match="capture failed for clip/G=7"):
        t = timing.measure_graph(lambda: None, device="cpu", inner=1, key="clip/G=7")
    assert t.mode == "eager" and "capture failed for clip/G=7 (RuntimeError: boom)" in t.fallback
    assert t.to_dict()["fallback"] == t.fallback
    monkeypatch.undo()
    plain = timing.measure(lambda: None, device="cpu")
    assert plain.mode == "eager" and "fallback" not in plain.to_dict()   # other timings unchanged
    assert timing.Timing(1, 1, 1, 1, 1, 20, 1, "cuda-graph replay of 5 calls").mode == "graph"


def test_tpt_towers_are_refused_where_open_clip_cannot_check_them(monkeypatch, capsys):
    from apm_fast._compat import TeacherDependencyError
    from apm_fast.bench import cli as bench_cli
    from apm_fast.bench import clip_models

    def missing():
        raise TeacherDependencyError("open_clip is not installed")

    monkeypatch.setattr(clip_models, "import_open_clip", missing)
    assert bench_cli.main(["--quick", "--no-out", "--tpt-towers", "ViT-B-16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bench: --tpt-towers: expected open_clip model names, got ['ViT-B-16'], which cannot be "
                   "checked: open_clip is not installed")


def test_clip_image_tower_peaks_count_the_image_tower_alone(monkeypatch):
    """scaling and table4: the image tower is built alone (no stub text tower on the device) before
    the peak's window, and its weight bytes are added to the peak measured above them."""
    import contextlib

    from apm_fast.bench import clip_models
    from apm_fast.bench.sections import scaling, table4
    from apm_fast.bench.timing import PeakMemory

    tower = clip_models.build_clip("ViT-B-16", device="cpu", quick=True, with_text=False)
    assert hasattr(tower, "conv1") and not hasattr(tower, "token_embedding") and not tower.training
    assert hasattr(clip_models.build_clip("ViT-B-16", device="cpu", quick=True), "token_embedding")

    inside = []

    @contextlib.contextmanager
    def window(device):
        pm = PeakMemory(device=str(device), baseline_bytes=0)
        inside.append(True)
        try:
            yield pm
        finally:
            inside.pop()
            pm.peak_bytes = 1000

    def build(*args, **kw):
        assert not inside, "the tower is built inside the peak's window"
        return clip_models.build_clip(*args, **kw)

    for mod in (scaling, table4):
        monkeypatch.setattr(mod, "peak_memory", window)
        monkeypatch.setattr(mod, "build_clip", build)
    ctx = _quick_ctx()
    point = scaling._clip_point(ctx, 4, 8, graph=False)
    weights = sum(p.numel() * p.element_size() for p in tower.parameters())
    assert point["weights_bytes"] == weights and point["peak_bytes"] == weights + 1000
    row = table4._teacher(ctx, "ViT-B-16")
    assert row["weights_bytes"] == weights and row["peak_bytes"] == weights + 1000
    assert row["params"] == clip_models.tower_params(tower) and row["timing_mode"] == "eager"


def test_memory_is_printed_in_binary_units_and_flops_say_their_convention():
    from apm_fast.bench.flops import FLOPS_CONVENTION
    from apm_fast.bench.report import fmt_bytes, format_section
    from apm_fast.bench.suite import _carries_flops

    assert fmt_bytes(3 * 2 ** 20) == "3.0 MiB" and fmt_bytes(2 ** 31) == "2.00 GiB" and fmt_bytes(None) == "-"
    assert FLOPS_CONVENTION == "1 multiply-add = 2 FLOPs"
    assert FLOPS_CONVENTION in format_section("scaling", {"rows": []})[0]
    assert format_section("table4", {"rows": [{"status": "skipped", "name": "x", "reason": "r"}]})[0] == \
        "FLOPs: 1 multiply-add = 2 FLOPs"
    assert _carries_flops([{"flops": 1}]) and _carries_flops([{"x": {"tflops": 2.0}}])
    assert _carries_flops([{"unit": "TFLOP/s"}]) and not _carries_flops([{"unit": "GB/s", "ms": 1.0}])
