"""The end-to-end pipeline on the CPU with a tiny random teacher: loading, teacher targets, class
embeddings (cached), students side by side, logits, result order."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apm_fast import APM, TestTimeTrainer, preset
from apm_fast.engine import TTTEngine, class_embeddings, classify_images, iter_classify_batches
from apm_fast.engine.data import load_rgb, normalize_student, student_pixels

CFG = dict(grid=5, patch=3, hidden=(24, 20, 12), dim=16, heads=4)
STEPS, LR = 3, 1e-2


def teacher_view(img):
    """Module-level (picklable for workers): 16 x 16, [0, 1] floats."""
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32) / 255.0).permute(2, 0, 1)


class TinyTeacher:
    def __init__(self, dim):
        torch.manual_seed(123)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(8, dim)).double()
        self.dim = dim
        self.preprocess = teacher_view
        self.device = torch.device("cpu")
        self.text_calls = 0

    def embed_images(self, x):
        return self.net(x.double())

    def embed_texts(self, texts):
        self.text_calls += 1
        out = []
        for t in texts:                               # deterministic per string
            g = torch.Generator().manual_seed(sum(map(ord, t)) * 7919 + len(t))
            out.append(torch.randn(self.dim, generator=g))
        return torch.stack(out)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(20, 17), (15, 15), (31, 22), (16, 40), (18, 18), (25, 19)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in sizes[:n]]


@pytest.mark.parametrize("workers", [0, 1])
def test_classify_equals_teacher_then_one_at_a_time_training(workers):
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", **CFG), dtype=torch.float64)
    teacher = TinyTeacher(16)
    imgs = _images(5)
    classes = ["cat", "dog", "ship", "tree"]
    res = classify_images(imgs, model, teacher, classes, steps=STEPS, lr=LR, backend="torch",
                          students=2, num_workers=workers, progress=False, topk=3)
    assert res.top1.shape == (5,) and res.topk.shape == (5, 3) and res.logits.shape == (5, 4)
    assert res.students == 2 and res.images_per_s > 0 and len(res.labels()) == 5
    # the same thing by hand, one image at a time with the autograd reference
    tv = torch.stack([teacher_view(im) for im in imgs])
    with torch.no_grad():
        targets = teacher.embed_images(tv).float()
    sv = normalize_student(torch.stack([student_pixels(im, 15) for im in imgs]))
    ref = TestTimeTrainer(model, steps=STEPS, lr=LR, backend="torch", engine=False).fit(sv.double(), targets.double())
    torch.testing.assert_close(res.cls, ref.cls.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.losses, ref.losses, rtol=1e-5, atol=1e-7)
    text = class_embeddings(teacher, classes)
    logits = 100 * F.normalize(ref.cls.float(), dim=-1) @ text.t()
    torch.testing.assert_close(res.logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(res.top1, logits.argmax(1))
    torch.testing.assert_close(res.teacher_logits, 100 * F.normalize(targets, dim=-1) @ text.t(), rtol=1e-4, atol=1e-4)
    assert len(res.teacher_labels()) == 5


def test_class_embeddings_cached_and_ensembled():
    teacher = TinyTeacher(16)
    a = class_embeddings(teacher, ["cat", "dog"])
    b = class_embeddings(teacher, ["cat", "dog"])
    assert a is b and teacher.text_calls == 1
    templates = ["a photo of a {}.", "a drawing of a {c}."]
    e = class_embeddings(teacher, ["cat", "dog"], templates)
    one = F.normalize(teacher.embed_texts(["a photo of a cat.", "a photo of a dog."]), dim=-1)
    two = F.normalize(teacher.embed_texts(["a drawing of a cat.", "a drawing of a dog."]), dim=-1)
    torch.testing.assert_close(e, F.normalize(one + two, dim=-1))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="templates"):
        class_embeddings(teacher, ["cat"], ["no placeholder"])


def test_engine_reuse_across_calls_and_errors():
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", **CFG), dtype=torch.float64)
    teacher = TinyTeacher(16)
    eng = TTTEngine(model, steps=STEPS, lr=LR, backend="torch", students=3)
    first = classify_images(_images(4), model, teacher, ["a", "b"], engine=eng, progress=False, num_workers=0)
    prog = eng._program
    again = classify_images(_images(4), model, teacher, ["a", "b"], engine=eng, progress=False, num_workers=0)
    assert eng._program is prog and torch.equal(first.cls, again.cls)
    with pytest.raises(ValueError, match="width 12"):
        classify_images(_images(1), model, TinyTeacher(12), ["a"], engine=eng, progress=False, num_workers=0)
    with pytest.raises(TypeError, match="embed_images"):
        classify_images(_images(1), model, object(), ["a"], engine=eng, progress=False)
    with pytest.raises(ValueError, match="at least one image"):
        classify_images([], model, teacher, ["a"], engine=eng, progress=False)


def test_student_view_and_loading():
    img = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3))
    px = student_pixels(img, 10)
    assert px.shape == (3, 10, 10) and px.dtype == torch.uint8
    # shorter side 20 -> 10 (scale 1/2): the crop is the middle 10 of the 15 resized columns
    full = torch.from_numpy(np.array(img.resize((15, 10), Image.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(px, full[:, :, 2:12])
    t = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    assert np.array_equal(np.asarray(load_rgb(t)), t.permute(1, 2, 0).numpy())
    with pytest.raises(TypeError, match="images"):
        load_rgb(torch.zeros(3, 4, 4))                  # float tensors are not pixels
    x = normalize_student(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                             (1 - 0.406) / 0.225]))


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    torch.manual_seed(0)
    model = APM(preset("ttt-l14", **CFG), dtype=torch.float64)
    teacher = TinyTeacher(16)
    good = _images(3)
    paths = []
    for i, im in enumerate(good):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg" * 20)
    sources = [paths[0], broken, paths[1], paths[2]]
    eng = TTTEngine(model, steps=STEPS, lr=LR, backend="torch", students=2)
    batches = list(iter_classify_batches(sources, model, teacher, ["a", "b"], engine=eng, num_workers=0))
    assert [b.failed for b in batches][0][0][0] == 1 and "broken.jpg" in batches[0].failed[0][1]
    assert torch.cat([b.indices for b in batches]).tolist() == [0, 2, 3]
    assert all(b.ttt_ms >= 0 and b.teacher_ms >= 0 for b in batches)
    ok = classify_images([paths[0], paths[1], paths[2]], model, teacher, ["a", "b"], engine=eng,
                         num_workers=0, progress=False)
    got = torch.cat([b.cls for b in batches])
    torch.testing.assert_close(got, ok.cls, rtol=0, atol=0)       # the bad file changed nothing
    with pytest.raises(ValueError, match=r"images\[1\].*broken.jpg"):
        classify_images(sources, model, teacher, ["a", "b"], engine=eng, num_workers=0, progress=False)
