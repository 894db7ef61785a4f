"""``apm-fast ttt --out``: one restart-safe results writer for one process and for torchrun's ranks.

A killed run started again computes only what is missing and writes every image once; a torn
last line is cut; lines left by a run with another number of processes count; a run with other
settings is refused; a diverged training is marked (strict JSON); a wrong --out is refused before
any long work."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from apm_fast.cli import main
from apm_fast.distributed.results import part_path, parts_dir
from tiny_clip import photo, write_config

N = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer")
    photos = root / "photos"
    photos.mkdir()
    for i in range(N):
        photo(60 + i, size=(30 + 3 * i, 26)).save(photos / f"p{i}.png")
    classes = root / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    args = ["ttt", str(photos), "--teacher", str(write_config(root)), "--pretrained", "none", "--classes",
            str(classes), "--grid", "4", "--patch", "4", "--hidden", "32,16", "--heads", "4", "--steps", "3",
            "--lr", "0.01", "--no-progress"]
    return dict(root=root, photos=photos, classes=classes, args=args)


def _lines(path):
    return [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
            for x in path.read_text().splitlines()]


def test_killed_run_restarts_with_every_image_once(setup, tmp_path):
    out = tmp_path / "r.jsonl"
    slow = [a if a != "3" else "400" for a in setup["args"]]          # 400 steps: a fraction of a second an image
    proc = subprocess.Popen([sys.executable, "-m", "apm_fast", *slow, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = part_path(out, 0)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not part.exists() or len(part.read_bytes().splitlines()) < 2):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(part.read_bytes().splitlines())
    assert 2 <= done < N, "killed in the middle of the run"
    with open(part, "ab") as f:                      # a write cut short by a full disk or a kill
        f.write(b'{"image": "torn')
    assert main([*slow, "--out", str(out)]) == 0
    lines = _lines(out)
    assert [x["image"] for x in lines] == sorted(str(p) for p in setup["photos"].iterdir())   # input order
    assert len({x["image"] for x in lines}) == N and not parts_dir(out).exists()
    assert main([*slow, "--out", str(out)]) == 0                     # all done: nothing added
    assert len(_lines(out)) == N


def test_lines_of_another_number_of_processes_count(setup, tmp_path, capsys):
    """A torchrun run of 2 ranks left rank 1's file: one process picks it up instead of
    recomputing those images."""
    out, ref = tmp_path / "r.jsonl", tmp_path / "ref.jsonl"
    assert main([*setup["args"], "--out", str(ref)]) == 0
    first = _lines(ref)[1]
    parts_dir(out).mkdir()
    part_path(out, 1).write_text(json.dumps(first) + "\n")
    capsys.readouterr()
    assert main([*setup["args"], "--out", str(out)]) == 0
    assert f"{N - 1} result(s) computed, 1 already in" in capsys.readouterr().err
    assert _lines(out)[1] == first and len(_lines(out)) == N


def test_other_settings_are_refused(setup, tmp_path, capsys):
    import apm_fast

    out = tmp_path / "r.jsonl"
    assert main([*setup["args"], "--out", str(out)]) == 0
    before = out.read_text()
    run = _lines(out)[0]["run"]
    assert run["version"] == apm_fast.__version__ and "commit" in run     # what made the results
    assert run["classes"] == 3 and run["heads"] == 4 and run["normalize_target"] is False
    capsys.readouterr()
    assert main([*setup["args"], "--out", str(out), "--steps", "4"]) == 2
    assert "other settings (steps: 3 there, 4 now)" in capsys.readouterr().err
    # another class list of the same length, and the flags that change what is trained
    other = tmp_path / "classes.txt"
    other.write_text("car\nbus\ntram\n")
    args = [a if a != str(setup["classes"]) else str(other) for a in setup["args"]]
    assert main([*args, "--out", str(out)]) == 2
    assert f"(classes_sha256: {run['classes_sha256']!r} there, " in capsys.readouterr().err
    assert main([*setup["args"], "--out", str(out), "--normalize-target"]) == 2
    assert "(normalize_target: False there, True now)" in capsys.readouterr().err
    heads = [a if a != "4" or setup["args"][i - 1] != "--heads" else "2" for i, a in enumerate(setup["args"])]
    assert main([*heads, "--out", str(out)]) == 2
    assert "(heads: 4 there, 2 now)" in capsys.readouterr().err
    assert out.read_text() == before


def test_a_file_holding_other_lines_is_refused_before_the_teacher_loads(setup, tmp_path, capsys, monkeypatch):
    """The results file is rewritten from its records at the end: a file with a user's notes is
    refused (one line, naming the file and the first bad line), not emptied of them; only a last
    line cut short by an interrupted write (the start of a record) is ignored."""
    from apm_fast.commands import common

    build_teacher = common.build_teacher
    monkeypatch.setattr(common, "build_teacher", lambda *a, **k: pytest.fail("built the teacher first"))
    record = json.dumps({"image": "elsewhere.png", "top1": "cat"})
    for text, bad in ((f"{record}\n\nmy notes\nmore\n", 3), ("notes without a newline", 1),
                      (f"{record}\n[1, 2]\n", 2), ('{"top1": "cat"}\n', 1)):
        out = tmp_path / "notes.jsonl"
        out.write_text(text)
        assert main([*setup["args"], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "RuntimeWarning" not in err, err
        assert err.startswith(f"apm-fast ttt: error: --out: {str(out)!r} line {bad}: expected a results record")
        assert out.read_text() == text
    # the same rule for a per-process file left by a killed run
    out = tmp_path / "r.jsonl"
    parts_dir(out).mkdir()
    part_path(out, 0).write_text(f"{record}\nnot a record\n")
    assert main([*setup["args"], "--out", str(out)]) == 2
    assert f"{str(part_path(out, 0))!r} line 2" in capsys.readouterr().err
    # a torn last line is the start of a record: ignored (and dropped at the merge)
    monkeypatch.setattr(common, "build_teacher", build_teacher)
    part_path(out, 0).unlink()
    out.write_text('{"image": "p0.png", "to')
    assert main([*setup["args"], "--out", str(out)]) == 0
    assert len(_lines(out)) == N


def test_the_same_image_twice_is_refused_before_the_teacher_loads(setup, tmp_path, capsys, monkeypatch):
    from apm_fast.commands import common

    monkeypatch.setattr(common, "build_teacher", lambda *a, **k: pytest.fail("built the teacher first"))
    image = str(sorted(setup["photos"].iterdir())[0])
    args = [setup["args"][0], image, image, *setup["args"][2:]]
    assert main([*args, "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == f"apm-fast ttt: error: IMAGES: inputs: {image!r} is listed twice (positions 0 and 1); " \
                  f"each input must appear once\n"


def test_interrupted_run_merges_what_is_done_and_goes_on(setup, tmp_path):
    """Ctrl-C (SIGINT): the finished images are in --out, stderr says how many; the same command
    run again computes only the others."""
    out = tmp_path / "r.jsonl"
    slow = [a if a != "3" else "200" for a in setup["args"]]          # 200 steps: a fraction of a second an image
    # SIGINT's default action in the child: a shell's background job (and so this test run) can
    # start with SIGINT ignored, and an ignored signal is inherited across exec
    proc = subprocess.Popen([sys.executable, "-m", "apm_fast", *slow, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    part = part_path(out, 0)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not part.exists() or len(part.read_bytes().splitlines()) < 2):
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before the interrupt"
    os.kill(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    done = len(_lines(out))
    assert 2 <= done < N, "interrupted in the middle of the run"
    assert not parts_dir(out).exists()
    assert f"apm-fast ttt: {done} of {N} result(s) in {out}; run the same command again to go on with the " \
           f"other {N - done}" in err and err.rstrip().endswith("apm-fast ttt: interrupted")
    r = subprocess.run([sys.executable, "-m", "apm_fast", *slow, "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and f"{N - done} result(s) computed, {done} already in" in r.stderr, r.stderr
    assert [x["image"] for x in _lines(out)] == sorted(str(p) for p in setup["photos"].iterdir())


def test_a_restarted_run_s_progress_bar_counts_the_images_left(setup, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    first = [str(p) for p in sorted(setup["photos"].iterdir())[:2]]
    assert main([setup["args"][0], *first, *setup["args"][2:], "--out", str(out)]) == 0
    capsys.readouterr()
    with_bar = [a for a in setup["args"] if a != "--no-progress"]
    assert main([*with_bar, "--out", str(out)]) == 0
    bar = capsys.readouterr().err.split("\r")[-1]
    assert f"100%" in bar and f" {N - 2}/{N - 2} " in bar, bar


def test_diverged_training_is_marked_in_strict_json(setup, tmp_path, capsys, monkeypatch):
    from apm_fast.ttt.trainer import Pending, TestTimeTrainer

    launch = TestTimeTrainer.launch

    def blown_up(self, *a, **k):                  # a training whose weights went to infinity
        job = launch(self, *a, **k)
        job.wait()
        return Pending(job.cls * float("nan"), job.losses * float("inf"), seconds=job.seconds)

    monkeypatch.setattr(TestTimeTrainer, "launch", blown_up)
    out = tmp_path / "r.jsonl"
    assert main([*setup["args"], "--out", str(out)]) == 1
    lines = _lines(out)                                               # json.loads refuses NaN above
    assert len(lines) == N and all(x["diverged"] for x in lines)
    assert all(v is None or isinstance(v, float) for x in lines for v in x["losses"])
    assert f"{N} diverged" in capsys.readouterr().err


def test_a_wrong_out_is_refused_before_any_long_work(setup, tmp_path, capsys, monkeypatch):
    from apm_fast.commands import common

    monkeypatch.setattr(common, "build_teacher", lambda *a, **k: pytest.fail("built the teacher first"))
    image = sorted(setup["photos"].iterdir())[0]
    for out, says in ((image, "is also an input"), (setup["classes"], "is also an input"),
                      (tmp_path, "cannot open")):
        assert main([*setup["args"], "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
