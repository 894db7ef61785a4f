"""apm-fast eval: the baselines against small independent restatements of their published
algorithms, the accuracy arithmetic against hand-computed records, a run killed with SIGKILL and
started again, settings checked against the run folder, and the command end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apm_fast.baselines import TPT, Views, Zero, _augmix_ops, select_confident
from apm_fast.cli import main
from apm_fast.evaluation import EvalSettings, summarize
from tiny_clip import TINY_DIM, random_teacher, write_config

CLASSES = ["cat", "dog", "ship", "tree"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An ImageFolder of 4 classes x 3 tiny generated images, its classes file and a tiny CLIP."""
    base = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (base / "set" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (28 + i, 36, 3), dtype=np.uint8)).save(base / "set" / c / f"{i}.png")
    (base / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"set": base / "set", "classes": base / "classes.txt", "config": write_config(base)}


def _args(root, out, *extra, methods="zeroshot,ensemble,apm,zero"):
    return ["eval", str(root["set"]), "--dataset", "folder", "--classes", str(root["classes"]),
            "--teacher", str(root["config"]), "--pretrained", "none", "--methods", methods, "--grid", "4",
            "--hidden", "24,16", "--steps", "3", "--views", "6", "--out", str(out), "--no-progress", *extra]


# ---------------------------------------------------------------- the baselines, restated
def test_zero_votes_the_confident_views_argmax():
    """ZERO on toy embeddings: of 20 views keep the 2 with the lowest entropy, predict the
    majority of their argmax classes (restated here with numpy)."""
    torch.manual_seed(0)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    views = torch.randn(3, 20, 8)
    got = Zero("zero", text, keep=0.1)(None, views)
    for b in range(3):
        logits = (100 * F.normalize(views[b], dim=-1) @ text.t()).double().numpy()
        shifted = logits - logits.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        ent = -(np.exp(logp) * logp).sum(1)
        kept = np.argsort(ent)[:2]
        votes = np.bincount(logits[kept].argmax(1), minlength=5)
        best = np.flatnonzero(votes == votes.max())
        assert int(got[b].argmax()) in best
        assert np.allclose(got[b].softmax(-1).numpy(), votes / votes.sum(), atol=1e-3)   # the vote share


def test_zero_breaks_a_tie_by_the_next_confident_view_as_zero_does():
    """Two kept views vote for classes 0 and 1 (a tie); of the views left out, by increasing
    entropy, the first to vote for 0 or 1 decides (here class 1, behind one voting 2); with none,
    the first view left out's larger tied logit decides."""
    text = torch.eye(4)
    def view(c, strength):                   # an embedding pointing at class c, sharper when strong
        v = torch.full((4,), 0.1)
        v[c] = strength
        return v
    views = torch.stack([view(0, 9.0), view(1, 8.0), view(2, 0.9), view(1, 0.8), view(0, 0.7),
                         torch.full((4,), 0.5), torch.full((4,), 0.5), torch.full((4,), 0.5),
                         torch.full((4,), 0.5), torch.full((4,), 0.5)])[None]
    got = Zero("zero", text, keep=0.2)(None, views)[0]
    assert int(got.argmax()) == 1
    assert got.softmax(-1)[:2].tolist() == pytest.approx([0.5, 0.5], abs=1e-3)       # the vote share
    views[0, 3] = view(3, 0.8)               # now the first left-out vote for 0 or 1 is class 0's
    assert int(Zero("zero", text, keep=0.2)(None, views)[0].argmax()) == 0
    other = torch.tensor([0.2, 0.3, 0.9, 0.1])             # votes 2: no left-out view votes for 0 or 1
    two = torch.stack([view(0, 9.0), view(1, 8.0), other])[None]
    assert int(Zero("zero", text, keep=0.67)(None, two)[0].argmax()) == 1   # its larger tied logit
    two[0, 2] = torch.tensor([0.3, 0.2, 0.9, 0.1])
    assert int(Zero("zero", text, keep=0.67)(None, two)[0].argmax()) == 0


def test_views_are_tpts_crops_and_augmix_drawn_by_the_image_index():
    """Views: bilinear random crops and flips, TPT's AugMix (its nine operations, none of the
    four that overlap ImageNet-C's corruptions) on fine-grained sets; the same image index gives
    the same views, also for a subset (:meth:`Views.of`, a resumed run)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    v = Views(5, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augmix=True, seed=3)
    a = v(img, 7)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, v(img, 7)) and not torch.equal(a, v(img, 6))
    assert torch.equal(v.of([2, 7, 9])(img, 1), a)
    ops = _augmix_ops()
    assert len(ops) == 9
    square = img.resize((30, 30))
    rng = np.random.default_rng(1)
    solarize = ops[4]
    light = Image.new("RGB", (8, 8), (230, 230, 230))
    for _ in range(50):                      # severity 1: solarize inverts only from 231 up
        assert solarize(light, 1.0, rng).getpixel((0, 0)) == (230, 230, 230)
    assert any(solarize(light, 10.0, rng).getpixel((0, 0)) != (230, 230, 230) for _ in range(50))
    for op in ops:                           # every operation keeps the crop's size and mode
        out = op(square, 1.0, rng)
        assert out.size == square.size and out.mode == "RGB"
    plain = Views(5, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augmix=False, seed=3)(img, 7)
    assert not torch.equal(plain, a)


def test_tpt_with_several_steps_keeps_the_views_chosen_at_the_first(tmp_path):
    """With steps > 1 the confident views are those of the first step (TPT's harness selects
    once), restated with the text tower written out."""
    teacher = random_teacher(write_config(tmp_path), seed=3)
    model = teacher.model
    torch.manual_seed(2)
    target, views = torch.randn(1, TINY_DIM), torch.randn(1, 20, TINY_DIM)
    got = TPT("tpt", teacher, CLASSES, steps=3, lr=0.5)(target, views)
    tokens = teacher.tokenizer([f"a photo of a {c}." for c in CLASSES])
    ctx = torch.nn.Parameter(model.token_embedding(tokens[:1])[0, 1:5].detach().clone())
    opt = torch.optim.AdamW([ctx], lr=0.5)
    feats = F.normalize(views[0], dim=-1)
    chosen = None
    for _ in range(3):
        logits = 100 * feats @ F.normalize(_encode_text(model, tokens, ctx), dim=-1).t()
        if chosen is None:
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            chosen = ent.argsort()[:2]
        avg = logits[chosen].softmax(-1).mean(0)
        loss = -(avg * avg.log()).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        want = 100 * F.normalize(target, dim=-1) @ F.normalize(_encode_text(model, tokens, ctx), dim=-1).t()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _encode_text(model, tokens, ctx):
    """CLIP's text tower restated: token embeddings with the context at positions 1..n, the
    positional embedding, the transformer, the final norm, the end-of-text token, the projection."""
    x = model.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.expand(x.shape[0], -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
    x = x + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ model.text_projection


def test_tpt_is_one_entropy_step_on_the_confident_views(tmp_path):
    """TPT: the 10% lowest-entropy views of 20, the entropy of their averaged probability, one
    AdamW step (lr 5e-3) on the 4 context embeddings of "a photo of a", then the image classified
    with the tuned prompt; restated with the text tower written out and torch.optim.AdamW."""
    teacher = random_teacher(write_config(tmp_path), seed=3)
    model = teacher.model
    torch.manual_seed(1)
    target, views = torch.randn(1, TINY_DIM), torch.randn(1, 20, TINY_DIM)
    got = TPT("tpt", teacher, CLASSES)(target, views)

    tokens = teacher.tokenizer([f"a photo of a {c}." for c in CLASSES])
    ctx = torch.nn.Parameter(model.token_embedding(tokens[:1])[0, 1:5].detach().clone())
    opt = torch.optim.AdamW([ctx], lr=5e-3)
    logits = 100 * F.normalize(views[0], dim=-1) @ F.normalize(_encode_text(model, tokens, ctx), dim=-1).t()
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    kept = logits[ent.argsort()[:2]]
    avg = kept.softmax(-1).mean(0)
    loss = -(avg * avg.log()).sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        want = 100 * F.normalize(target, dim=-1) @ F.normalize(_encode_text(model, tokens, ctx), dim=-1).t()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    untuned = 100 * F.normalize(target, dim=-1) @ teacher.class_embeddings(CLASSES, ["a photo of a {c}."]).t()
    assert not torch.allclose(got, untuned, atol=1e-6), "the step must move the prompt"
    again = TPT("tpt", teacher, CLASSES)(target, views)
    torch.testing.assert_close(again, got)               # the context is reset for every image


def test_confidence_selection_keeps_at_least_one():
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 9.0]])
    assert select_confident(logits, 0.1).tolist() == [[0.0, 9.0]]
    assert select_confident(logits, 0.7).shape[0] == 2


# ---------------------------------------------------------------- accuracy arithmetic
def test_summary_arithmetic_on_hand_written_records():
    recs = [
        {"dataset": "a", "label": 2, "methods": {"apm": {"pred": 2, "top5": [2, 0], "ms": 10.0},
                                                 "zeroshot": {"pred": 0, "top5": [0, 1], "ms": 2.0}}},
        {"dataset": "a", "label": 1, "methods": {"apm": {"pred": 0, "top5": [0, 1], "ms": 30.0},
                                                 "zeroshot": {"pred": 1, "top5": [1, 3], "ms": 2.0}}, "apm_diverged": True},
        {"dataset": "b", "label": 0, "methods": {"apm": {"pred": 0, "top5": [0], "ms": 20.0}}},
    ]
    rows = {(r["dataset"], r["method"]): r for r in summarize(recs, ["zeroshot", "apm"])}
    assert rows["a", "apm"]["top1"] == 50.0 and rows["a", "apm"]["top5"] == 100.0
    assert rows["a", "apm"]["images_per_s"] == pytest.approx(2 / 0.040) and rows["a", "apm"]["diverged"] == 1
    assert rows["a", "zeroshot"]["top1"] == 50.0 and rows["a", "zeroshot"]["top5"] == 50.0
    assert rows["b", "apm"]["images"] == 1 and ("b", "zeroshot") not in rows
    assert [r["method"] for r in summarize(recs, ["zeroshot", "apm"])][:2] == ["zeroshot", "apm"]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="methods: expected distinct names"):
        EvalSettings(methods=("apm", "clip"))
    with pytest.raises(ValueError, match="lr: expected a positive finite number"):
        EvalSettings(lr=float("nan"))
    with pytest.raises(ValueError, match="views: expected an integer >= 2"):
        EvalSettings(views=1)
    with pytest.raises(ValueError, match="crop: expected 'center' or 'stretch'"):
        EvalSettings(crop=None)
    assert EvalSettings(crop="stretch").to_dict()["crop"] == "stretch"     # in run.json: a resume keeps it


# ---------------------------------------------------------------- the command
def test_eval_end_to_end_and_a_rerun_adds_nothing(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(root, out)) == 0
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and len({r["key"] for r in recs}) == 12
    for r in recs:
        assert set(r["methods"]) == {"zeroshot", "ensemble", "apm", "zero"}
        assert 0 <= r["label"] < 4 and r["image"].endswith(".png")
        for name, m in r["methods"].items():
            # ZERO ranks only the classes that got votes (with 6 views, one voting view: one class)
            assert len(m["top5"]) == (1 if name == "zero" else 4) and m["pred"] == m["top5"][0] and m["ms"] > 0
            assert m["probs"] == sorted(m["probs"], reverse=True) and all(p > 0 for p in m["probs"][:1])
        assert len(r["apm_losses"]) == 3 and r["apm_diverged"] is False
    by_label = [r["label"] for r in recs]
    assert sorted(by_label) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("dataset,method,top1,top5") and len(csv_rows) == 5
    zs = [r for r in recs if True]
    top1 = 100 * sum(r["methods"]["zeroshot"]["pred"] == r["label"] for r in zs) / 12
    assert f"folder,zeroshot,{top1:.2f}," in (out / "summary.csv").read_text()
    assert "steps" in (out / "summary.md").read_text() and (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(_args(root, out)) == 0                          # everything is there: nothing new
    assert "(12 already in" in capsys.readouterr().err
    assert len((out / "records.jsonl").read_text().splitlines()) == 12
    # other settings into the same folder are refused before any work
    assert main(_args(root, out, methods="zeroshot")) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
    # run.json states the class list, the precision and the backend the training used, the teacher's
    run = json.loads((out / "run.json").read_text())
    want = "bf16" if torch.cuda.is_available() else "fp32"
    assert run["precision"] == want and run["classes"]["folder"]["count"] == 4
    assert run["teacher_precision"] == want
    assert run["backend"] in ("torch", "triton", "cuda") and (run["backend"] == "torch" or torch.cuda.is_available())
    # another class file of the same length is another run
    other = tmp_path / "other.txt"
    other.write_text("cat\ndog\ntree\nship\n")
    args = [a if a != str(root["classes"]) else str(other) for a in _args(root, out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"(classes of folder: {run['classes']['folder']!r} there, {{'count': 4, 'sha256': " in err, err
    assert json.loads((out / "run.json").read_text()) == run


def test_killed_run_resumes_with_nothing_lost_or_twice(root, tmp_path):
    """SIGKILL while records are being written, then the same command: every image exactly once,
    no torn line, and the deterministic methods' records equal those of a run never killed. The
    killed process sleeps 0.2 s per record so that the kill lands mid-run on any machine."""
    out, ref = tmp_path / "killed", tmp_path / "whole"
    code = ("import sys, time\n"
            "import apm_fast.evaluation as e\n"
            "record = e._record\n"
            "e._record = lambda *a: (time.sleep(0.2), record(*a))[1]\n"
            "from apm_fast.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code] + _args(root, out, methods="zeroshot,apm,zero")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(records.read_bytes().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records.read_bytes()
    assert 4 <= len(before.splitlines()) < 12, "killed in the middle of the run"
    with open(records, "ab") as f:                              # and as if the kill tore a line
        f.write(b'{"key": "folder:torn", "dataset": "fol')
    assert main(_args(root, out, methods="zeroshot,apm,zero")) == 0
    assert main(_args(root, ref, methods="zeroshot,apm,zero")) == 0
    lines = records.read_text().splitlines()
    got = {json.loads(x)["key"]: json.loads(x) for x in lines}
    assert len(lines) == len(got) == 12, "every image once"
    want = {json.loads(x)["key"]: json.loads(x) for x in (ref / "records.jsonl").read_text().splitlines()}
    assert set(got) == set(want)
    for k, r in got.items():
        for m in ("zeroshot", "apm", "zero"):      # ZERO: each image's views drawn as in a whole run
            assert r["methods"][m]["top5"] == want[k]["methods"][m]["top5"], (k, m)
            assert r["methods"][m]["probs"] == pytest.approx(want[k]["methods"][m]["probs"], abs=1e-6), (k, m)
        assert r["apm_losses"] == pytest.approx(want[k]["apm_losses"], rel=1e-5)


@pytest.fixture
def no_teacher(monkeypatch):
    """Loading the teacher fails the test: what is checked here comes before it."""
    from apm_fast.commands import common

    monkeypatch.setattr(common, "build_teacher", lambda *a, **k: pytest.fail("built the teacher first"))


def test_eval_refuses_precision_and_moments_that_contradict_before_the_teacher(root, tmp_path, capsys, no_teacher):
    out = tmp_path / "o"
    assert main(_args(root, out, "--precision", "fp64", "--moments", "bf16")) == 2
    err = capsys.readouterr().err
    assert err.startswith("apm-fast eval: error: --moments: 'bf16' moments need fp32 master weights"), err
    assert not out.exists()


def test_run_json_adds_another_backend_and_refuses_a_file_without_the_teachers_precision(root, tmp_path, capsys):
    """The backend is where and how (eval has no option for it): a continuation on another one
    is stated beside it. A run file that does not say the teacher's precision (an older
    version's) is another run, refused naming the field, as the precision was."""
    out = tmp_path / "run"
    assert main(_args(root, out, "--limit", "4", methods="zeroshot,apm")) == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(run, backend="triton")))
    assert main(_args(root, out, "--limit", "6", methods="zeroshot,apm")) == 0
    assert json.loads((out / "run.json").read_text()) == dict(run, backend=f"triton,{run['backend']}")
    del run["teacher_precision"]
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(_args(root, out, "--limit", "6", methods="zeroshot,apm")) == 2
    want = "bf16" if torch.cuda.is_available() else "fp32"
    assert f"(teacher_precision: None there, {want!r} now)" in capsys.readouterr().err


def test_eval_refuses_a_root_without_the_dataset(root, tmp_path, capsys, no_teacher):
    out = tmp_path / "o"
    assert main(["eval", str(tmp_path), "--dataset", "imagenet-a", "--teacher", str(root["config"]),
                 "--pretrained", "none", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "imagenet-a" in err and "error" in err
    assert not out.exists(), "nothing written: the corrected command is not taken for another run"


@pytest.mark.parametrize("extra, message", [
    (["--corruption", "fog"], "corruption (--corruption) applies only to imagenet-c, not to 'folder'"),
    (["--severity", "3"], "severity (--severity) applies only to imagenet-c, not to 'folder'"),
])
def test_eval_refuses_options_no_listed_dataset_uses(root, tmp_path, capsys, no_teacher, extra, message):
    out = tmp_path / "o"
    assert main(_args(root, out, *extra)) == 2
    assert capsys.readouterr().err == f"apm-fast eval: error: {message}\n"
    assert not out.exists()
    args = ["eval", str(root["set"]), "--dataset", "imagenet-a", "--classes", str(root["classes"]),
            "--teacher", str(root["config"]), "--pretrained", "none", "--out", str(out)]
    assert main(args) == 2
    assert "classes_file (--classes) applies only to 'folder', not to 'imagenet-a'" in capsys.readouterr().err


def test_eval_refuses_a_records_file_holding_other_lines(root, tmp_path, capsys, no_teacher):
    out = tmp_path / "o"
    out.mkdir()
    (out / "records.jsonl").write_text('{"key": "folder:x"}\nmy notes\n')
    assert main(_args(root, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"apm-fast eval: error: out: {str(out / 'records.jsonl')!r} line 2: expected a "
                          f"results record") and err.count("\n") == 1, err
    assert (out / "records.jsonl").read_text() == '{"key": "folder:x"}\nmy notes\n'


def test_evaluate_refuses_a_dataset_listed_twice(root, tmp_path):
    from apm_fast.evaluation import evaluate

    with pytest.raises(ValueError, match="datasets: 'folder' is listed twice"):
        evaluate(root["set"], ["folder", "folder"], teacher=lambda: pytest.fail("teacher"), out=tmp_path / "o",
                 classes_file=root["classes"])


def test_eval_on_an_imagenet_set_takes_its_1000_names_with_their_repeats(root, tmp_path):
    """ImageNet's list repeats two names (distinct classes): an ImageNet set runs end to end, its
    records name classes by index up to 999."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "data" / "imagenetv2-matched-frequency-format-val"
    for k in range(1000):
        (folder / str(k)).mkdir(parents=True)
    for k in (3, 999):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(folder / str(k) / "a.png")
    out = tmp_path / "run"
    assert main(["eval", str(tmp_path / "data"), "--dataset", "imagenet-v2", "--teacher", str(root["config"]),
                 "--pretrained", "none", "--methods", "zeroshot,apm", "--grid", "4", "--hidden", "24,16",
                 "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in records) == [3, 999]
    for r in records:
        for m in ("zeroshot", "apm"):
            assert all(0 <= k < 1000 for k in r["methods"][m]["top5"])


def test_eval_says_in_one_line_when_the_student_does_not_fit(root, tmp_path, capsys):
    """The same one-line error as ttt's (one check for both): the sizes and the bytes asked for."""
    rc = main(_args(root, tmp_path / "big", "--grid", "1000000", "--hidden", "100000,16", methods="apm"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "--grid 1000000, --hidden 100000,16: the student does not fit in the memory of cpu" in err


def test_a_diverged_training_is_a_miss_with_strict_json_not_class_0():
    """APM whose training diverged (NaN scores): no prediction (a miss in the summary), no NaN in
    the record; before, the top-k of NaN logits was class 0, 1, 2 and counted as a hit for 0."""
    from apm_fast.classify import Classification
    from apm_fast.datasets import EvalSet
    from apm_fast.evaluation import _record

    s = EvalSet(id="folder", classnames=("a", "b", "c"), templates=("{c}",), items=(("/d/a/0.png", 0),),
                root="/d", num_total=1)
    nan = float("nan")
    r = Classification(image="/d/a/0.png", index=0, topk=[("a", nan), ("b", nan)], top_indices=[0, 1],
                       losses=[1.0, nan], teacher_ms=1.0, ttt_ms=2.0)
    rec = _record(s, r, 0, "/d/a/0.png")
    assert rec["key"] == "folder:a/0.png" and rec["apm_diverged"] is True
    assert rec["methods"]["apm"] == {"pred": None, "top5": [], "probs": [], "ms": 3.0}
    json.dumps(rec, allow_nan=False)                     # strict JSON
    (row,) = summarize([rec], ["apm"])
    assert row["top1"] == 0.0 and row["top5"] == 0.0 and row["diverged"] == 1


def test_eval_keys_images_by_their_place_in_the_set_and_summarizes_this_runs_images(root, tmp_path, capsys):
    """The same images through a linked root are already done (not counted twice); a smaller
    --limit than before summarizes that many images."""
    out = tmp_path / "run"
    assert main(_args(root, out, "--limit", "8", methods="zeroshot")) == 0
    link = tmp_path / "link"
    link.symlink_to(root["set"], target_is_directory=True)
    linked = dict(root, set=link)
    capsys.readouterr()
    assert main(_args(linked, out, "--limit", "8", methods="zeroshot")) == 0
    assert "(8 already in" in capsys.readouterr().err
    assert len((out / "records.jsonl").read_text().splitlines()) == 8
    assert main(_args(root, out, "--limit", "3", methods="zeroshot")) == 0
    assert ",3," in (out / "summary.csv").read_text().splitlines()[1]


def test_evaluate_names_its_bad_arguments_before_writing(root, tmp_path):
    from apm_fast.evaluation import evaluate

    teacher = random_teacher(root["config"], seed=0)
    ok = EvalSettings(methods=("zeroshot",), teacher=str(root["config"]), pretrained=None)
    out = tmp_path / "never"
    for kw, err, match in ((dict(teacher=None), TypeError, "teacher: expected an apm_fast.teachers.Teacher"),
                           (dict(settings={"steps": 3}), TypeError, "settings: expected an apm_fast.EvalSettings"),
                           (dict(datasets="folder"), TypeError, "datasets: expected a list of dataset ids"),
                           (dict(datasets=[]), ValueError, "datasets: expected at least one dataset id"),
                           (dict(device="bogus"), ValueError, "device: expected cpu, cuda or cuda:N")):
        args = dict(root=root["set"], datasets=["folder"], teacher=teacher, out=out, settings=ok,
                    classes_file=root["classes"])
        args.update(kw)
        with pytest.raises(err, match=match):
            evaluate(args.pop("root"), args.pop("datasets"), **args)
    assert not out.exists()
    with pytest.raises(ValueError, match="teacher: settings name 'ViT-B-16', the teacher given is 'apm-test-tiny-clip'"):
        evaluate(root["set"], ["folder"], teacher=teacher, out=out, classes_file=root["classes"],
                 settings=EvalSettings(methods=("zeroshot",)))
    for bad, match in ((dict(tpt_lr=-1), "tpt_lr: expected a positive finite number"),
                       (dict(tpt_steps=0), "tpt_steps: expected a positive integer"),
                       (dict(grid=0), "grid: expected a positive integer"),
                       (dict(precision="int8"), "precision: expected one of"),
                       (dict(keep="0.5"), r"keep: expected a fraction in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            EvalSettings(**bad)
