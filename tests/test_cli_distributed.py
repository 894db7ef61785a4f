"""``torchrun -m apm_fast ttt``: the images split over 2 CPU ranks (gloo on 127.0.0.1), one results
file equal to a single-process run's, and a rerun that recomputes nothing.

Tolerance: both runs do, per image, the same float32 operations on the same shapes (batch of one,
the same seeded student and random teacher) in one thread each (torchrun sets OMP_NUM_THREADS=1;
the single-process reference runs with one thread too), so the lines are expected to be
bit-identical, and are as measured. RTOL = 1e-6 (about 8 float32 ulps) only absorbs a math
library choosing another kernel (e.g. by memory alignment); a real fault (an image trained from
another init or seed, paired with another image's teacher embedding, or a line carrying another
image's results) moves the losses by more than 1e-2 relative (the three images' losses differ
from one another by that much).

The batched pipeline (--students) regroups the images into other batches on each rank, which
changes the float32 summation order of the logits: its probabilities are compared at 1e-4
relative (a logit of 100 cos off by a few float32 ulps of the cosine moves a probability by
~1e-5 relative), its losses still at RTOL.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from apm_fast.cli import main
from tiny_clip import photo, write_config

RTOL = 1e-6
ARGS = ["--pretrained", "none", "--grid", "4", "--patch", "4", "--hidden", "32,16", "--heads", "4",
        "--steps", "2", "--lr", "0.01", "--topk", "2", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-dist")
    photos = root / "photos"
    photos.mkdir()
    for i, size in enumerate([(40, 30), (20, 64), (33, 33)]):
        photo(30 + i, size=size).save(photos / f"p{i}.png")
    (photos / "p0_broken.jpg").write_bytes(b"garbage, not a jpeg" * 10)
    classes = root / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    common = ["ttt", str(photos), "--teacher", str(write_config(root)), "--classes", str(classes), *ARGS]
    return dict(root=root, photos=photos, common=common)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, module="apm_fast", **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", module, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _single(args, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # as each torchrun rank: the same float32 summation order
    try:
        rc = main(args)
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    return rc


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def _compare(got, want, prob_rtol):
    assert [l["image"] for l in got] == [l["image"] for l in want], "each image once, in input order"
    for g, w in zip(got, want):
        assert set(g) == set(w), "the same fields as a single-process line"
        assert g["top1"] == w["top1"] and g["teacher_top1"] == w["teacher_top1"]
        assert [c for c, _ in g["topk"]] == [c for c, _ in w["topk"]]
        assert [c for c, _ in g["teacher_topk"]] == [c for c, _ in w["teacher_topk"]]
        assert _rel([p for _, p in g["topk"]], [p for _, p in w["topk"]]) <= prob_rtol
        assert _rel([p for _, p in g["teacher_topk"]], [p for _, p in w["teacher_topk"]]) <= prob_rtol
        assert len(g["losses"]) == 2 and _rel(g["losses"], w["losses"]) <= RTOL, g["image"]
        assert g["run"] == w["run"]


def test_two_ranks_write_the_single_process_lines_and_a_rerun_recomputes_nothing(setup, tmp_path, capsys):
    single, out = tmp_path / "single.jsonl", tmp_path / "results.jsonl"
    assert _single(setup["common"] + ["--out", str(single)], capsys) == 1       # the broken file
    want = _lines(single)
    assert len(want) == 3

    proc = _torchrun(setup["common"] + ["--out", str(out)])
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]                  # some image failed, as without torchrun
    broken = str(setup["photos"] / "p0_broken.jpg")
    assert err.count(f"skipped {broken}: ") == 1 and "not an image" in err
    assert "3 result(s) in" in err and "merged from 2 ranks" in err
    got = _lines(out)
    assert broken not in {l["image"] for l in got}
    _compare(got, want, prob_rtol=RTOL)
    assert not (tmp_path / "results.jsonl.parts").exists()
    # each rank computed its own share, 2 of the 4 sorted inputs: rank 1 has the broken file, so
    # rank 0 learns of it from rank 1 before merging
    computed = [int(err.split(f"rank {r}/2: ")[1].split(" result(s) computed")[0]) for r in (0, 1)]
    assert sorted(computed) == [1, 2]

    before = out.read_bytes()
    proc = _torchrun(setup["common"] + ["--out", str(out)])
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert out.read_bytes() == before, "a rerun must leave the results as they are"
    for r in (0, 1):
        assert f"rank {r}/2: 0 result(s) computed" in err
    skipped = [int(err.split(f"rank {r}/2: 0 result(s) computed, ")[1].split(" already in")[0]) for r in (0, 1)]
    assert sum(skipped) == 3 and "(skipped)" in err
    assert err.count(f"skipped {broken}: ") == 1                # still reported, still absent


def test_two_ranks_through_the_batched_pipeline(setup, tmp_path, capsys):
    single, out = tmp_path / "single.jsonl", tmp_path / "results.jsonl"
    batched = ["--backend", "torch", "--students", "2"]
    assert _single(setup["common"] + batched + ["--out", str(single)], capsys) == 1
    proc = _torchrun(setup["common"] + batched + ["--out", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "p0_broken.jpg: " in proc.stderr
    _compare(_lines(out), _lines(single), prob_rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_each_rank_on_its_own_device(setup, tmp_path):
    """On a GPU the CLI takes the batched pipeline (bf16 GEMMs, captured steps). Losses are
    compared at 2e-2 relative: bf16 keeps 8 bits (4e-3 per rounding) and the images are grouped
    into other batches than in the single-GPU run; the structural checks are exact."""
    single, out = tmp_path / "single.jsonl", tmp_path / "results.jsonl"
    args = setup["common"] + ["--students", "2"]
    proc = subprocess.run([sys.executable, "-m", "apm_fast", *args, "--out", str(single)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    nvls_off = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    proc = _torchrun(args + ["--out", str(out)], **nvls_off)
    assert proc.returncode == 1, proc.stderr[-3000:]
    got, want = _lines(out), _lines(single)
    assert [l["image"] for l in got] == [l["image"] for l in want] and len(got) == 3
    assert {l["run"]["device"] for l in got} == {"cuda:0", "cuda:1"}
    for g, w in zip(got, want):
        assert g["top1"] == w["top1"]
        assert _rel(g["losses"], w["losses"]) <= 2e-2, g["image"]
    before = out.read_bytes()
    proc = _torchrun(args + ["--out", str(out)], **nvls_off)
    assert out.read_bytes() == before and "rank 1/2: 0 result(s) computed" in proc.stderr


@pytest.mark.parametrize("more_images, opts, message", [
    ([], [], "--out: 2 ranks (WORLD_SIZE=2) write one results file"),
    ([], ["--out", "{tmp}/r.jsonl", "--device", "cuda:1"],
     "--device: with 2 ranks each rank computes on cuda:LOCAL_RANK"),
    (["{photos}/p0.png"], ["--out", "{tmp}/r.jsonl"], "IMAGES: inputs: '{photos}/p0.png' is listed twice"),
    ([], ["--out", "{tmp}/no/such/folder/r.jsonl"], "--out: cannot open"),
])
def test_several_ranks_set_up_errors(setup, tmp_path, capsys, monkeypatch, more_images, opts, message):
    monkeypatch.setenv("WORLD_SIZE", "2")              # checked before any process group is joined
    fill = dict(tmp=tmp_path, photos=setup["photos"])
    c = setup["common"]
    args = c[:2] + [x.format(**fill) for x in more_images] + c[2:] + [x.format(**fill) for x in opts]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("apm-fast ttt: error: ") and message.format(**fill) in err


def test_students_side_by_side_equal_one_at_a_time(setup, tmp_path, capsys):
    """One process: --students 2 (batches of two side by side) writes the lines of the default
    (one image at a time on a CPU), the broken file skipped in both."""
    seq, bat = tmp_path / "seq.jsonl", tmp_path / "bat.jsonl"
    assert main(setup["common"] + ["--out", str(seq)]) == 1
    capsys.readouterr()
    assert main(setup["common"] + ["--out", str(bat), "--students", "2"]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "p0_broken.jpg" in err and "3 result(s) computed" in err
    a = [json.loads(x) for x in seq.read_text().splitlines()]
    b = [json.loads(x) for x in bat.read_text().splitlines()]
    assert [x["image"] for x in b] == [x["image"] for x in a] and len(b) == 3
    for x, y in zip(a, b):
        assert y["top_indices"] == x["top_indices"] and y["teacher_top_indices"] == x["teacher_top_indices"]
        assert y["losses"] == pytest.approx(x["losses"], rel=1e-4)
        assert y["ttt_ms"] > 0 and y["run"]["students"] == 2 and x["run"]["students"] == 1


@pytest.mark.parametrize("args, message", [
    (["check", "--preset", "ttt-x99"], "--preset: expected one of ssl-l14, ttt-b16, ttt-h14, ttt-l14, got 'ttt-x99'"),
    (["check", "--hidden", "24,x"], "--hidden: expected comma-separated integers"),
    (["ttt", "--data", "d.pt", "--out", "o.jsonl", "--steps", "0"], "--steps: expected a positive integer, got '0'"),
    (["ttt", "--data", "d.pt", "--out", "o.jsonl", "--lr", "nan"], "--lr: expected a learning rate"),
    (["ttt", "--data", "d.pt", "--out", "o.jsonl", "--seed", "99999999999999999999999"],
     "--seed: expected an integer in [0, 2**63 - 1], got '99999999999999999999999'"),
])
def test_the_torchrun_entry_refuses_bad_arguments_by_name(capsys, args, message):
    """``-m apm_fast.distributed`` reads its options with the command line's own argument types:
    refused before any process group starts."""
    from apm_fast.distributed.__main__ import main as dist_main

    with pytest.raises(SystemExit) as info:
        dist_main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_the_torchrun_check_on_one_process():
    """The self-check's defaults parse (its --hidden default goes through the same type) and pass."""
    from apm_fast.distributed.__main__ import main as dist_main

    assert dist_main(["check", "--device", "cpu", "--steps", "2"]) == 0


# ------------------------------------------------------------------ -m apm_fast.distributed ttt
SHAPE = ["--grid", "5", "--patch", "2", "--hidden", "24,16", "--dim", "8", "--heads", "2"]
TINY = [*SHAPE, "--dtype", "float64", "--device", "cpu", "--steps", "2", "--lr", "0.01"]
DIST_ERROR = "python -m apm_fast.distributed {}: error: "


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    """A --data file of three 10 x 10 images (grid 5 x patch 2) with 8-wide targets, and a file
    that is neither a torch file nor a results file."""
    root = tmp_path_factory.mktemp("dist-ttt")
    g = torch.Generator().manual_seed(0)
    torch.save({"names": ["a", "b", "c"], "images": torch.randn(3, 3, 10, 10, generator=g),
                "targets": torch.randn(3, 8, generator=g)}, root / "data.pt")
    (root / "notes.txt").write_text("my notes\n")
    return root


def _dist(args, capsys):
    from apm_fast.distributed.__main__ import main as dist_main

    rc = dist_main(args)
    return rc, capsys.readouterr().err


def test_the_torchrun_ttt_states_its_settings_and_refuses_a_rerun_with_others(tensors, tmp_path, capsys):
    """Every record carries the run's settings; a rerun into the same --out with other settings is
    refused before any training (as apm-fast ttt --out), one with the same settings (another
    backend allowed) goes on, and --no-resume starts afresh."""
    out = tmp_path / "r.jsonl"
    base = ["ttt", "--data", str(tensors / "data.pt"), "--out", str(out), *TINY]
    rc, err = _dist(base, capsys)
    assert rc == 0, err
    recs = _lines(out)
    assert [r["input"] for r in recs] == ["a", "b", "c"]
    run = recs[0]["run"]
    assert all(r["run"] == run for r in recs)
    assert {k: run[k] for k in ("model", "preset", "grid", "patch", "hidden", "heads", "dim", "steps",
                                "lr", "dtype", "precision", "moments", "seed", "device")} == {
        "model": None, "preset": "ttt-l14", "grid": 5, "patch": 2, "hidden": [24, 16], "heads": 2,
        "dim": 8, "steps": 2, "lr": 0.01, "dtype": "float64", "precision": "fp64", "moments": "fp64",
        "seed": 0, "device": "cpu"}
    before = out.read_bytes()

    rc, err = _dist(base + ["--steps", "7", "--lr", "0.5", "--seed", "5"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(DIST_ERROR.format("ttt") + f"--out: {str(out)!r} holds results made with other "
                          f"settings (lr: 0.01 there, 0.5 now, seed: 0 there, 5 now, steps: 2 there, 7 now)")
    assert out.read_bytes() == before and not (tmp_path / "r.jsonl.parts").exists()

    for backend in ("torch", "reference"):          # the backend may differ between a run and its restart
        rc, err = _dist(base + ["--backend", backend], capsys)
        assert rc == 0 and '"skipped": 3, "computed": 0' in err, err
        assert out.read_bytes() == before

    rc, err = _dist(base + ["--steps", "3", "--no-resume"], capsys)
    assert rc == 0, err
    assert [(r["input"], r["run"]["steps"], len(r["losses"])) for r in _lines(out)] == [
        ("a", 3, 3), ("b", 3, 3), ("c", 3, 3)]


_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize("args, message", [
    (["--backend", "bogus"], "backend: unknown name 'bogus'"),
    pytest.param(["--backend", "triton"], "backend 'triton' is not available here", marks=_NO_GPU),
    pytest.param(["--device", "cuda"], "--device: 'cuda' asked for, but torch sees no CUDA GPU here",
                 marks=_NO_GPU),
    (["--model", "{root}/nope.safetensors"], "--model: path: no apm-fast checkpoint at '{root}/nope.safetensors'"),
    (["--data", "{root}/notes.txt"], "--data: '{root}/notes.txt' is not a file written by torch.save"),
    (["--data", "{root}/nope.pt"], "--data: no such file: '{root}/nope.pt'"),
    (["--out", "{root}/notes.txt"], "--out: '{root}/notes.txt' line 1: expected a results record"),
    (["--grid", "4"], "--data: images: expected 8 x 8 pixels (grid 4 x patch 2), got 10 x 10"),
    (["check"], "heads: the pool splits dim=8 over heads; expected a divisor of 8, got heads=3"),
])
def test_the_torchrun_entry_reports_bad_input_in_one_line(tensors, tmp_path, capsys, monkeypatch, args, message):
    """Bad options and files are the main command line's errors: one line naming the option, exit
    status 2, no traceback, before anything is computed or written."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")     # the tests' interpreter would make triton available
    if args == ["check"]:
        cmd, argv = "check", ["check", "--device", "cpu", "--heads", "3"]
    else:
        cmd = "ttt"
        opts = TINY[len(SHAPE):] if "--model" in args else TINY    # --model fixes the shape itself
        argv = ["ttt", "--data", str(tensors / "data.pt"), "--out", str(tmp_path / "r.jsonl"), *opts,
                *[a.format(root=tensors) for a in args]]
    rc, err = _dist(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(DIST_ERROR.format(cmd)) and message.format(root=tensors) in err, err
    assert (tensors / "notes.txt").read_text() == "my notes\n"
    assert not (tmp_path / "r.jsonl").exists() or (tmp_path / "r.jsonl").read_bytes() == b""


def _tiny_model(path, seed):
    from apm_fast import APM, preset

    torch.manual_seed(seed)
    APM(preset("ttt-l14", grid=5, patch=2, hidden=(24, 16), dim=8, heads=2)).save(path)
    return path


def test_the_torchrun_ttt_states_the_model_file_by_content_and_refuses_a_changed_one(tensors, tmp_path, capsys):
    """--model is stated by its path and the sha256 of its bytes: a rerun with the same file goes on,
    one after the file at that path was replaced by another model is refused (it would mix two
    models' results in one file), before anything is written."""
    import hashlib

    model, out = _tiny_model(tmp_path / "m.safetensors", seed=1), tmp_path / "r.jsonl"
    base = ["ttt", "--data", str(tensors / "data.pt"), "--out", str(out), "--model", str(model),
            *TINY[len(SHAPE):]]
    rc, err = _dist(base, capsys)
    assert rc == 0, err
    first = hashlib.sha256(model.read_bytes()).hexdigest()
    run = _lines(out)[0]["run"]
    assert (run["model"], run["model_sha256"], run["preset"], run["seed"]) == (str(model), first, None, None)
    before = out.read_bytes()
    rc, err = _dist(base, capsys)
    assert rc == 0 and '"skipped": 3, "computed": 0' in err, err

    _tiny_model(model, seed=2)                      # another model at the same path
    second = hashlib.sha256(model.read_bytes()).hexdigest()
    rc, err = _dist(base, capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(DIST_ERROR.format("ttt") + f"--out: {str(out)!r} holds results made with other "
                          f"settings (model_sha256: {first!r} there, {second!r} now)"), err
    assert out.read_bytes() == before and not (tmp_path / "r.jsonl.parts").exists()


@pytest.mark.parametrize("given", [["--preset", "ttt-l14"], ["--grid", "5"], ["--patch", "2"], ["--hidden", "24,16"],
                                   ["--dim", "8"], ["--heads", "2"], ["--seed", "0"], SHAPE])
def test_the_torchrun_ttt_refuses_model_options_beside_model(tensors, tmp_path, capsys, given):
    """--model's file fixes the config and the weights: an option that would build another student
    is refused by name rather than ignored, even when it repeats its default (--preset ttt-l14,
    --seed 0), before anything is written."""
    model = _tiny_model(tmp_path / "m.safetensors", seed=1)
    out = tmp_path / "r.jsonl"
    rc, err = _dist(["ttt", "--data", str(tensors / "data.pt"), "--out", str(out), "--model", str(model),
                     *TINY[len(SHAPE):], *given], capsys)
    named = ", ".join(a for a in given if a.startswith("--"))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(DIST_ERROR.format("ttt") + f"{named}: not used with --model, whose file fixes the "
                          f"model's config and weights; expected {'it' if len(given) == 2 else 'them'} left out"), err
    assert not out.exists()


def test_two_ranks_of_the_torchrun_ttt_refuse_other_settings_in_one_line_each(tensors, tmp_path, capsys):
    """Under torchrun (2 gloo ranks) the refusal is one line per rank (torchrun stops the other rank
    once one has exited, so it may not get to print), exit status 2, and --out is left as it was."""
    out = tmp_path / "r.jsonl"
    base = ["ttt", "--data", str(tensors / "data.pt"), "--out", str(out), *TINY]
    assert _dist(base, capsys)[0] == 0
    before = out.read_bytes()
    proc = _torchrun(base + ["--steps", "3"], module="apm_fast.distributed")
    err = proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith(DIST_ERROR.format("ttt"))]
    assert 1 <= len(lines) <= 2 and all("steps: 2 there, 3 now" in l for l in lines), err[-3000:]
    assert "apm_fast/distributed" not in err and "CLIError" not in err, err[-3000:]
    assert out.read_bytes() == before and not (tmp_path / "r.jsonl.parts").exists()
