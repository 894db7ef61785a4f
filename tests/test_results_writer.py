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
    out = tmp_path / "r.jsonl"
    assert main([*setup["args"], "--out", str(out)]) == 0
    before = out.read_text()
    capsys.readouterr()
    assert main([*setup["args"], "--out", str(out), "--steps", "4"]) == 2
    assert "other settings (steps: 3 there, 4 now)" in capsys.readouterr().err
    assert out.read_text() == before


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
