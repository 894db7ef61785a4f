"""apm_fast.classify / iter_classify, the one pipeline: the teacher once per image, TTT, zero-shot
against the cached class texts; batches of students side by side give the one-at-a-time results;
unreadable images are reported and skipped."""
import pytest
import torch
import torch.nn.functional as F

from apm_fast import APM, TestTimeTrainer, classify, iter_classify, preset
from apm_fast.images import load_image, preprocess
from tiny_clip import TINY_DIM, photo, random_teacher, write_config

CLASSES = ["cat", "dog", "bird", "fish", "car", "tree"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return random_teacher(write_config(tmp_path_factory.mktemp("tiny_clip")), seed=0)


def _trainer(steps=3, dim=TINY_DIM, **kw):
    torch.manual_seed(0)
    cfg = preset("ttt-b16", grid=4, patch=4, hidden=(32, 16), dim=dim, heads=4)
    return TestTimeTrainer(APM(cfg), steps=steps, lr=1e-2, **kw)


def test_classify_matches_fit_on_the_teachers_target(teacher, tmp_path, monkeypatch):
    trainer = _trainer()
    imgs = [photo(10), photo(11, size=(50, 20))]
    path = tmp_path / "third.png"
    photo(12).save(path)
    image_calls, text_calls = [], []
    enc_i, enc_t = teacher._encode_images, teacher._encode_texts
    monkeypatch.setattr(teacher, "_encode_images", lambda x: image_calls.append(x.shape[0]) or enc_i(x))
    monkeypatch.setattr(teacher, "_encode_texts", lambda t: text_calls.append(len(t)) or enc_t(t))
    teacher.clear_text_cache()

    results = classify(trainer, imgs + [str(path)], teacher, CLASSES, topk=3)

    assert [r.image for r in results] == ["<image 0>", "<image 1>", str(path)]
    assert [r.index for r in results] == [0, 1, 2]
    assert image_calls == [1, 1, 1]               # the teacher once per image, never in the loop
    assert text_calls == [len(CLASSES)]           # the class texts once for all images
    text = teacher.class_embeddings(CLASSES)
    for r, pil in zip(results, imgs + [load_image(path)]):
        target = teacher.embed_images(pil)
        fit = trainer.fit(preprocess(pil, trainer.model.config)[None], target)
        logits = 100 * F.normalize(fit.cls, dim=-1) @ text.T
        probs, idx = logits[0].softmax(-1).topk(3)
        assert r.top_indices == idx.tolist() and [c for c, _ in r.topk] == [CLASSES[i] for i in idx]
        torch.testing.assert_close(torch.tensor([p for _, p in r.topk]), probs, rtol=1e-5, atol=1e-6)
        assert r.losses == pytest.approx(fit.losses[0].tolist(), rel=1e-5)
        t_idx = (F.normalize(target, dim=-1) @ text.T)[0].argmax()
        assert r.teacher_top1 == CLASSES[t_idx] and r.teacher_top_indices[0] == int(t_idx)
        assert len(r.losses) == 3 and r.ttt_ms > 0 and r.teacher_ms > 0
        assert r.topk[0][1] >= r.topk[1][1] >= r.topk[2][1]
    d = results[0].to_dict()
    assert d["top1"] == results[0].top1 and len(d["teacher_topk"]) == 3 and "error" not in d


@pytest.mark.parametrize("workers", [0, 1])
def test_students_side_by_side_give_the_one_at_a_time_results(teacher, workers):
    """Batches of 2 students (5 images: 2, 2, 1) through the loader's workers equal the autograd
    reference trained one image at a time on the same inputs."""
    imgs = [photo(30 + i, size=(20 + 3 * i, 17 + i)) for i in range(5)]
    batched = classify(_trainer(students=2), imgs, teacher, CLASSES, topk=6, num_workers=workers)
    alone = classify(_trainer(backend="reference"), imgs, teacher, CLASSES, topk=6)
    for a, b in zip(batched, alone):
        assert a.top_indices == b.top_indices
        assert [p for _, p in a.topk] == pytest.approx([p for _, p in b.topk], rel=1e-4, abs=1e-6)
        assert a.losses == pytest.approx(b.losses, rel=1e-4)


def test_result_does_not_depend_on_the_other_images(teacher):
    a, b = photo(20), photo(21)
    trainer = _trainer(steps=2)
    alone = classify(trainer, b, teacher, CLASSES, topk=6)[0]
    after = classify(trainer, [a, b], teacher, CLASSES, topk=6)[1]
    assert [c for c, _ in alone.topk] == [c for c, _ in after.topk]
    assert [p for _, p in alone.topk] == pytest.approx([p for _, p in after.topk], rel=1e-5)
    assert alone.losses == pytest.approx(after.losses, rel=1e-6)


def test_unreadable_images_are_reported_and_skipped(teacher, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        photo(40 + i).save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg" * 20)
    trainer = _trainer(students=2)
    got = list(iter_classify(trainer, [paths[0], broken, paths[1], paths[2]], teacher, CLASSES))
    assert [r.index for r in got if r.error is None] == [0, 2, 3]
    bad = [r for r in got if r.error is not None]
    assert len(bad) == 1 and bad[0].index == 1 and "broken.jpg" in bad[0].error and bad[0].image == str(broken)
    ok = classify(trainer, paths, teacher, CLASSES)
    for a, b in zip([r for r in got if r.error is None], ok):        # the bad file changed nothing
        assert a.top_indices == b.top_indices and a.losses == pytest.approx(b.losses, rel=1e-5)
    with pytest.raises(ValueError, match=r"images\[1\].*broken.jpg"):
        classify(trainer, [paths[0], broken], teacher, CLASSES)


def test_classify_refuses_bad_input(teacher):
    with pytest.raises(ValueError, match=r"embeds in 24 dims but the model's dim is 32; .*dim=24"):
        classify(_trainer(dim=32), photo(0), teacher, CLASSES)
    trainer = _trainer()
    with pytest.raises(ValueError, match="images: expected at least one image"):
        classify(trainer, [], teacher, CLASSES)
    with pytest.raises(ValueError, match="topk: expected a positive integer, got 0"):
        classify(trainer, photo(0), teacher, CLASSES, topk=0)
    with pytest.raises(ValueError, match=r"images\[0\]: .*expected a PIL image, a file path, a numpy array"):
        classify(trainer, [42], teacher, CLASSES)
    with pytest.raises(TypeError, match="teacher: expected an apm_fast.teachers.Teacher"):
        classify(trainer, photo(0), object(), CLASSES)
    # top-k larger than the class set: all classes, best first
    assert len(classify(trainer, photo(0), teacher, ["cat", "dog"], topk=5)[0].topk) == 2


def test_the_authors_stretch_is_the_students_view_with_crop_none(teacher):
    """crop=None: the student sees the whole image stretched to S x S (the authors' TTT input),
    the same as fitting on ``preprocess(..., crop=None)``; the teacher keeps its own view."""
    trainer = _trainer()
    wide = photo(13, size=(60, 20))
    got = classify(trainer, [wide], teacher, CLASSES, topk=3, crop=None)[0]
    target = teacher.embed_images(wide)
    fit = trainer.fit(preprocess(wide, trainer.model.config, crop=None)[None], target)
    assert got.losses == pytest.approx(fit.losses[0].tolist(), rel=1e-5)
    centre = classify(trainer, [wide], teacher, CLASSES, topk=3)[0]
    assert centre.losses != pytest.approx(got.losses, rel=1e-5)
    with pytest.raises(ValueError, match="crop: expected 'center' or None"):
        classify(trainer, [wide], teacher, CLASSES, crop="stretch")
