"""The apm-fast command line, end to end on a tiny teacher and student."""
import json
import subprocess
import sys

import pytest
import torch

from apm_fast.cli import main
from tiny_clip import photo, random_teacher, write_config

# a tiny student: D follows the teacher (24); 4 x 4 grid of 4-pixel patches
TINY_STUDENT = ["--grid", "4", "--patch", "4", "--hidden", "32,16", "--heads", "4", "--steps", "3",
                "--lr", "0.01", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder with two photos, a corrupt 'jpeg' and a text file; a teacher config + checkpoint;
    a class file."""
    root = tmp_path_factory.mktemp("cli")
    photos = root / "photos"
    photos.mkdir()
    photo(1, size=(40, 30)).save(photos / "a.png")
    photo(2, size=(20, 64)).save(photos / "c.jpg")
    (photos / "b_broken.jpg").write_bytes(b"garbage, not a jpeg" * 10)
    (photos / "readme.txt").write_text("not an image, and not picked up from a directory")
    config = write_config(root)
    ckpt = root / "teacher.pt"
    torch.save(random_teacher(config, seed=5).model.state_dict(), ckpt)
    classes = root / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    return dict(root=root, photos=photos, config=config, ckpt=ckpt, classes=classes)


def _ttt(s, *extra, out=None):
    args = ["ttt", str(s["photos"]), "--teacher", str(s["config"]), "--pretrained", str(s["ckpt"]),
            "--classes", str(s["classes"]), *TINY_STUDENT, *extra]
    if out is not None:
        args += ["--out", str(out)]
    return main(args)


def test_ttt_skips_the_corrupt_file_and_writes_the_others(setup, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    rc = _ttt(setup, "--topk", "2", out=out)
    err = capsys.readouterr().err
    assert rc == 1                                          # some input failed
    assert "skipped" in err and "b_broken.jpg" in err and "not an image" in err
    assert "2 result(s) computed" in err and "1 image(s) skipped" in err
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["image"] for l in lines] == [str(setup["photos"] / "a.png"), str(setup["photos"] / "c.jpg")]
    for l in lines:
        assert l["top1"] in ("cat", "dog", "bird") and len(l["topk"]) == 2
        assert l["teacher_top1"] == l["teacher_topk"][0][0]
        assert len(l["losses"]) == 3 and l["ttt_ms"] > 0
        assert l["run"]["teacher"] == "apm-test-tiny-clip" and l["run"]["random_teacher"] is False
        assert l["run"]["dim"] == 24 and l["run"]["grid"] == 4 and l["run"]["hidden"] == [32, 16]
        # stated in every record: bf16 GEMMs by default on a GPU (the CLI's default device), fp32 on the CPU
        want = "bf16" if torch.cuda.is_available() else "fp32"
        assert l["run"]["precision"] == want and l["run"]["moments"] == "fp32"
        assert l["run"]["teacher_precision"] == want        # the teacher's own, whatever --precision says
    # a rerun skips what is done (the unreadable file is tried again); same seed, same results
    assert _ttt(setup, "--topk", "2", out=out) == 1
    assert [json.loads(l) for l in out.read_text().splitlines()] == lines
    other = tmp_path / "again.jsonl"
    assert _ttt(setup, "--topk", "2", out=other) == 1
    again = [json.loads(l) for l in other.read_text().splitlines()]
    assert again[0]["losses"] == pytest.approx(lines[0]["losses"])


def test_ttt_with_the_authors_stretch_says_so_and_a_resume_keeps_it(setup, tmp_path, capsys):
    """--crop stretch: the student sees the whole (non-square) photo, so the losses differ from
    the centre crop's; every record states the crop, and resuming with the other one is refused."""
    centre, stretch = tmp_path / "centre.jsonl", tmp_path / "stretch.jsonl"
    assert _ttt(setup, out=centre) == 1 and _ttt(setup, "--crop", "stretch", out=stretch) == 1
    a = [json.loads(l) for l in centre.read_text().splitlines()]
    b = [json.loads(l) for l in stretch.read_text().splitlines()]
    assert [l["run"]["crop"] for l in a] == ["center"] * 2 and [l["run"]["crop"] for l in b] == ["stretch"] * 2
    assert a[0]["losses"][-1] != pytest.approx(b[0]["losses"][-1], rel=1e-6)
    capsys.readouterr()
    assert _ttt(setup, out=stretch) == 2
    assert "crop: 'stretch' there, 'center' now" in capsys.readouterr().err


def test_ttt_with_bf16_moments_says_so_and_stays_close(setup, tmp_path, capsys):
    full, half = tmp_path / "fp32.jsonl", tmp_path / "bf16.jsonl"
    assert _ttt(setup, out=full) == 1 and _ttt(setup, "--moments", "bf16", out=half) == 1
    a = [json.loads(l) for l in full.read_text().splitlines()]
    b = [json.loads(l) for l in half.read_text().splitlines()]
    assert [l["run"]["moments"] for l in b] == ["bf16", "bf16"]
    for x, y in zip(a, b):
        assert y["losses"][0] == pytest.approx(x["losses"][0])            # before the first update
        assert y["losses"][-1] == pytest.approx(x["losses"][-1], rel=5e-2)
    with pytest.raises(SystemExit):
        main(["ttt", "x.png", "--moments", "fp8"])
    assert "argument --moments: invalid choice: 'fp8'" in capsys.readouterr().err


def test_ttt_states_the_teachers_precision_and_refuses_a_file_without_it(setup, tmp_path, capsys):
    """teacher_precision in every record, whatever --precision says (the student's only); the lines
    of a version that did not state it are another run, refused naming the field, as for crop."""
    out = tmp_path / "r.jsonl"
    want = "bf16" if torch.cuda.is_available() else "fp32"
    assert _ttt(setup, "--precision", "fp64", out=out) == 1
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(l["run"]["precision"], l["run"]["teacher_precision"]) for l in lines] == [("fp64", want)] * 2
    for l in lines:
        del l["run"]["teacher_precision"]
    out.write_text("".join(json.dumps(l) + "\n" for l in lines))
    capsys.readouterr()
    assert _ttt(setup, "--precision", "fp64", out=out) == 2
    assert f"(teacher_precision: None there, {want!r} now)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--backend", "warp"], "--backend: unknown name 'warp'; expected one of ['reference', 'torch', 'triton', 'cuda']"),
    (["--backend", "reference", "--precision", "bf16"], "--precision: the reference backend trains the plain model "
                                                        "in its own dtype (fp32); expected no precision, got 'bf16'"),
    (["--backend", "reference", "--moments", "bf16"], "--moments: the reference backend keeps Adam's moments in the "
                                                      "model's dtype, as torch.optim.Adam does: expected "
                                                      "'fp32' (or none given), got 'bf16'"),
    (["--precision", "fp64", "--moments", "bf16"], "--moments: 'bf16' moments need fp32 master weights"),
])
def test_ttt_refuses_training_options_before_the_teacher_naming_the_flag(setup, capsys, monkeypatch, args, message):
    from apm_fast.commands import common

    monkeypatch.setattr(common, "build_teacher", lambda *a, **k: pytest.fail("built the teacher first"))
    assert _ttt(setup, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("apm-fast ttt: error: " + message) and err.count("\n") == 1, err


def test_ttt_to_stdout_with_only_good_files(setup, capsys):
    rc = main(["ttt", str(setup["photos"] / "a.png"), "--teacher", str(setup["config"]),
               "--pretrained", "none", "--classes", str(setup["classes"]), *TINY_STUDENT])
    cap = capsys.readouterr()
    assert rc == 0
    (line,) = cap.out.splitlines()
    assert json.loads(line)["run"]["random_teacher"] is True
    assert "RANDOM weights" in cap.err


@pytest.mark.parametrize("args, message", [
    (["--teacher", "ViT-B-61"], "unknown open_clip model 'ViT-B-61'"),
    (["--pretrained", "absent.pt"], "checkpoint file 'absent.pt' does not exist"),
    (["--classes", "no_such_classes.txt"], "'no_such_classes.txt', which is not an existing file"),
    (["--backend", "warp"], "error: --backend: unknown name 'warp'"),
])
def test_ttt_setup_errors_are_one_line(setup, capsys, args, message):
    opts = {"--teacher": str(setup["config"]), "--pretrained": str(setup["ckpt"]),
            "--classes": str(setup["classes"])}
    opts.update(zip(args[::2], args[1::2]))
    flat = [x for kv in opts.items() for x in kv]
    rc = main(["ttt", str(setup["photos"] / "a.png"), *flat, *TINY_STUDENT])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("apm-fast ttt: error: ") and message in err and "Traceback" not in err


def test_a_student_too_large_for_the_memory_is_one_line(setup, capsys, monkeypatch):
    """A real failed allocation (the first layer's 800 PB, past any address space), then the
    CUDA allocator's own exception (simulated: no GPU here): a one-line error naming the sizes
    and the bytes asked for, exit code 2."""
    rc = _ttt(setup, "--grid", "1000000", "--hidden", "100000,16")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line.startswith("apm-fast ttt: error: --grid 1000000, --hidden 100000,16: the student does not fit")
    assert "asked for 800000000000000000 bytes" in line

    import apm_fast.model

    def cuda_oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                     "capacity of 79.11 GiB of which 1.5 GiB is free.")

    monkeypatch.setattr(apm_fast.model, "APM", cuda_oom)
    assert _ttt(setup) == 2
    err = capsys.readouterr().err
    assert "apm-fast ttt: error: --grid 4, --hidden 32,16: the student does not fit" in err
    assert "(asked for 2.00 GiB)" in err and "Traceback" not in err


def test_ttt_empty_folder(setup, tmp_path, capsys):
    assert main(["ttt", str(tmp_path), "--teacher", str(setup["config"]), *TINY_STUDENT]) == 2
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["ttt", "x.png", "--steps", "0"], "--steps: expected a positive integer, got '0'"),
    (["ttt", "x.png", "--hidden", "64,abc"], "--hidden: expected comma-separated integers"),
    (["ttt", "x.png", "--templates", "many"], "invalid choice: 'many'"),
    (["ttt"], "the following arguments are required: IMAGES"),
    # a preset's name is checked as the command line is read, before a teacher is loaded
    (["ttt", "x.png", "--preset", "ttt-x99"],
     "--preset: expected 'auto' or one of ssl-l14, ttt-b16, ttt-h14, ttt-l14, got 'ttt-x99'"),
    (["eval", "root", "--preset", "ttt-x99"], "--preset: expected 'auto' or one of"),
    (["distill", "--preset", "auto"], "--preset: expected one of ssl-l14, ttt-b16, ttt-h14, ttt-l14, got 'auto'"),
    (["bench", "--students-list", "1", "0"], "--students-list: expected a positive integer, got '0'"),
    (["bench", "--e2e-images", "-1"], "--e2e-images: expected a non-negative integer, got '-1'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    # the seed's one argument type (ttt, eval, demo): a negative or int64-overflowing seed
    (["demo", "--seed", "-1"], "--seed: expected an integer in [0, 2**63 - 1], got '-1'"),
    (["demo", "--seed", str(2 ** 63)], "--seed: expected an integer in [0, 2**63 - 1]"),
    # a dataset given twice would be written and counted twice
    (["eval", "root", "--dataset", "imagenet-a", "--dataset", "imagenet-r", "--dataset", "imagenet-a"],
     "argument --dataset: 'imagenet-a' is given twice"),
])
def test_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("python", "torch", "triton", "open_clip_torch", "torch CUDA build", "backends:", "reference",
                 "available"):
        assert word in out


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "apm_fast", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("apm-fast ")


def test_demo_falls_back_to_random_teacher_weights(setup, capsys, monkeypatch):
    from apm_fast.teachers import OpenCLIPTeacher, WeightsUnavailable

    def offline(*a, **kw):
        raise WeightsUnavailable("pretrained: weights not cached and the network is down (test)")

    monkeypatch.setattr(OpenCLIPTeacher, "_resolve_pretrained", staticmethod(offline))
    rc = main(["demo", "--teacher", str(setup["config"]), "--pretrained", "openai", "--steps", "1",
               "--classes", str(setup["classes"]), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "network is down (test)" in out and "going on with RANDOM teacher weights" in out
    assert "RANDOM weights" in out and "reduced for the CPU (grid 16" in out
    table = out[out.index("image "):].splitlines()
    assert [row.split()[0] for row in table[2:6]] == ["astronaut", "coffee", "chelsea", "rocket"]


def test_demo_class_names_are_imagenet_names():
    from apm_fast.commands.demo import CPU_CLASSES
    from apm_fast.teachers import imagenet_classnames

    assert set(CPU_CLASSES) <= set(imagenet_classnames())
