"""``apm-fast ttt`` through the batched pipeline (--students) gives the per-image loop's results."""
import json

import pytest
import torch

from apm_fast.cli import main
from tiny_clip import photo, random_teacher, write_config

TINY_STUDENT = ["--grid", "4", "--patch", "4", "--hidden", "32,16", "--heads", "4", "--steps", "3",
                "--lr", "0.01", "--no-progress", "--topk", "2", "--backend", "torch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-batched")
    photos = root / "photos"
    photos.mkdir()
    for i, size in enumerate([(40, 30), (20, 64), (33, 33), (50, 21)]):
        photo(10 + i, size=size).save(photos / f"p{i}.png")
    (photos / "p1_broken.jpg").write_bytes(b"garbage, not a jpeg" * 10)
    config = write_config(root)
    ckpt = root / "teacher.pt"
    torch.save(random_teacher(config, seed=5).model.state_dict(), ckpt)
    classes = root / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    return dict(photos=photos, config=config, ckpt=ckpt, classes=classes)


def _ttt(s, out, *extra):
    return main(["ttt", str(s["photos"]), "--teacher", str(s["config"]), "--pretrained", str(s["ckpt"]),
                 "--classes", str(s["classes"]), *TINY_STUDENT, "--out", str(out), *extra])


def test_batched_pipeline_equals_the_per_image_loop(setup, tmp_path, capsys):
    seq, bat = tmp_path / "seq.jsonl", tmp_path / "bat.jsonl"
    assert _ttt(setup, seq) == 1
    capsys.readouterr()
    assert _ttt(setup, bat, "--students", "2") == 1                # the broken file still fails
    err = capsys.readouterr().err
    assert "skipped" in err and "p1_broken.jpg" in err and "4 result(s) written" in err
    a = [json.loads(l) for l in seq.read_text().splitlines()]
    b = [json.loads(l) for l in bat.read_text().splitlines()]
    assert [l["image"] for l in b] == [l["image"] for l in a] and len(b) == 4
    for x, y in zip(a, b):
        assert y["top1"] == x["top1"] and y["teacher_top1"] == x["teacher_top1"]
        assert y["losses"] == pytest.approx(x["losses"], rel=1e-4)
        assert [c for c, _ in y["topk"]] == [c for c, _ in x["topk"]]
        assert y["ttt_ms"] > 0 and y["run"]["students"] == 2
