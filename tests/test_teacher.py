"""The open_clip teacher on a tiny model: weights from files, warnings, prompts, text cache, errors."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from apm_fast._compat import TeacherDependencyError, import_open_clip
from apm_fast.teachers import (OpenCLIPTeacher, RandomWeightsWarning, WeightsUnavailable,
                               resolve_classes, resolve_templates)
from tiny_clip import TINY_DIM, TINY_NAME, counting_text_calls as _counting, photo, random_teacher


@pytest.fixture(scope="module")
def teacher(config_path):
    return random_teacher(config_path, seed=0)


# ---------------------------------------------------------------- the import guard
def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_guard_makes_torchvision_import_and_is_idempotent():
    r = _run("""
        import torch
        from apm_fast._compat import ensure_torchvision_importable, _has_schema
        first = ensure_torchvision_importable()
        import torchvision, torchvision.transforms
        print(first, ensure_torchvision_importable(), _has_schema("torchvision::nms"), _has_schema("torchvision::qnms"))
    """)
    assert r.returncode == 0, r.stderr
    first, second, nms, qnms = r.stdout.split()
    # `first` is True on a CPU torch next to a CUDA torchvision, False where torchvision is healthy
    assert first in ("True", "False")
    assert (second, nms, qnms) == ("False", "True", "True")


def test_guard_registers_nothing_when_the_schemas_exist():
    # stands in for a healthy torchvision: the schemas are already there before the guard runs
    # (torchvision's own library is not loaded here: a healthy one would clash with these)
    r = _run("""
        import torch
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from apm_fast import _compat
        _compat._try_load_torchvision_library = lambda spec: None
        print(_compat.ensure_torchvision_importable(), _compat._LIBRARY is None)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_import_open_clip_reports_a_missing_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(TeacherDependencyError, match="pip install open_clip_torch"):
        import_open_clip()


# ---------------------------------------------------------------- weights
def test_checkpoint_file_reloads_the_same_embeddings(teacher, config_path, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(teacher.model.state_dict(), ckpt)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = OpenCLIPTeacher(TINY_NAME, ckpt, device="cpu")
    assert not loaded.random_weights and loaded.pretrained == str(ckpt)
    other = random_teacher(config_path, seed=123)
    img = photo(1)
    texts = ["a photo of a cat.", "a photo of a dog."]
    assert torch.equal(loaded.embed_images(img), teacher.embed_images(img))
    assert torch.equal(loaded.embed_texts(texts), teacher.embed_texts(texts))
    assert not torch.allclose(other.embed_images(img), teacher.embed_images(img))


def test_random_weights_warn_and_log(config_path, caplog):
    with caplog.at_level(logging.WARNING, logger="apm_fast.teachers.openclip"):
        with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
            t = OpenCLIPTeacher(str(config_path), None, device="cpu")
    assert t.random_weights
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)


def test_unknown_model_name_suggests_and_says_how_to_list():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-61'.*ViT-B-16.*apm-fast info --teachers"):
        OpenCLIPTeacher("ViT-B-61", None)


def test_missing_model_config_file():
    with pytest.raises(ValueError, match="model config file 'nowhere/tiny.json' does not exist"):
        OpenCLIPTeacher("nowhere/tiny.json", None)


def test_missing_checkpoint_file(config_path, tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt' does not exist"):
        OpenCLIPTeacher(str(config_path), missing)


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'no-such-tag' is neither a known tag of ViT-B-16 \(known tags: \[.*'openai'"):
        OpenCLIPTeacher("ViT-B-16", "no-such-tag")


def test_corrupt_checkpoint_file(config_path, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not load checkpoint .*corrupt.pt"):
        OpenCLIPTeacher(str(config_path), bad)


def test_tag_without_network_fails_fast_and_clearly(monkeypatch, tmp_path):
    from apm_fast.teachers import openclip

    monkeypatch.setattr(openclip, "_reachable", lambda url, timeout: "no route (test)")
    with pytest.raises(WeightsUnavailable, match=r"ViT-B-16 tagged 'openai' .*no route \(test\).*pretrained=PATH"):
        OpenCLIPTeacher("ViT-B-16", "openai", cache_dir=str(tmp_path))  # empty cache: nothing to reuse


# ---------------------------------------------------------------- images
def test_embed_images_pil_and_preprocessed_tensor_agree(teacher):
    imgs = [photo(2), photo(3, size=(25, 60))]
    z = teacher.embed_images(imgs)
    assert z.shape == (2, TINY_DIM) and z.dtype == torch.float32 and teacher.dim == TINY_DIM
    pixels = torch.stack([teacher.preprocess(im) for im in imgs])
    torch.testing.assert_close(teacher.embed_images(pixels), z)
    assert not torch.allclose(z.norm(dim=-1), torch.ones(2))          # raw by default
    torch.testing.assert_close(teacher.embed_images(imgs, normalize=True), F.normalize(z, dim=-1))


def test_the_image_tower_states_the_precision_it_computes_in(teacher, monkeypatch):
    """image_precision (results' teacher_precision) comes from the autocast embed_images enters:
    none on a CPU (the weights' fp32), bf16 on a GPU, none for fp64 weights (autocast leaves fp64)."""
    import contextlib

    assert teacher.image_autocast() is None and teacher.image_precision == "fp32"
    monkeypatch.setattr(teacher, "device", torch.device("cuda"))          # no GPU needed: nothing runs
    assert teacher.image_autocast() == torch.bfloat16 and teacher.image_precision == "bf16"
    monkeypatch.setattr(teacher, "dtype", torch.float64)
    assert teacher.image_autocast() is None and teacher.image_precision == "fp64"
    monkeypatch.undo()
    entered = []
    monkeypatch.setattr(teacher, "image_autocast", lambda: torch.bfloat16)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: entered.append((a, k)) or contextlib.nullcontext())
    teacher.embed_images([photo(2)])
    assert entered == [(("cuda",), {"dtype": torch.bfloat16})]


def test_embed_images_refuses_bad_input(teacher):
    with pytest.raises(ValueError, match=r"preprocessed for teacher apm-test-tiny-clip \(B x 3 x 32 x 32.*got shape \(1, 3, 31, 32\)"):
        teacher.embed_images(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="NaN/Inf"):
        teacher.embed_images(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="at least one image"):
        teacher.embed_images([])
    with pytest.raises(TypeError, match=r"images\[0\]: expected a PIL image"):
        teacher.embed_images(["cat.jpg"])


# ---------------------------------------------------------------- prompts and the text cache
def test_text_cache_hit_and_miss(teacher, monkeypatch):
    teacher.clear_text_cache()
    calls = _counting(teacher, monkeypatch)
    a = teacher.class_embeddings(["cat", "dog", "bird"])
    assert calls == [["a photo of a cat.", "a photo of a dog.", "a photo of a bird."]]
    b = teacher.class_embeddings(("cat", "dog", "bird"), "single")     # same key: no new encoding
    assert len(calls) == 1 and torch.equal(b, a) and b is not a
    b.mul_(0)                                                           # the caller's own copy
    assert torch.equal(teacher.class_embeddings(["cat", "dog", "bird"]), a) and len(calls) == 1
    teacher.class_embeddings(["cat", "dog"])                            # other classes: encoded
    assert len(calls) == 2
    teacher.class_embeddings(["cat", "dog", "bird"], ["a {c}."])        # other templates: encoded
    assert len(calls) == 3
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))


def test_template_ensemble_is_the_renormalized_mean(teacher):
    t1, t2 = "a photo of a {c}.", "a drawing of the {c}."
    classes = ["cat", "dog"]
    e1 = teacher.embed_texts([t1.replace("{c}", c) for c in classes], normalize=True)
    e2 = teacher.embed_texts([t2.replace("{c}", c) for c in classes], normalize=True)
    ens = teacher.class_embeddings(classes, [t1, t2])
    torch.testing.assert_close(ens, F.normalize(e1 + e2, dim=-1))
    torch.testing.assert_close(teacher.class_embeddings(classes, [t1, t1]), e1)
    assert not torch.allclose(ens, e1)


def test_ensemble_templates_are_the_80_of_clip():
    temps = resolve_templates("ensemble")
    assert len(temps) == 80 and len(set(temps)) == 80 and all("{c}" in t for t in temps)
    assert resolve_templates("single") == ("a photo of a {c}.",)
    with pytest.raises(ValueError, match="templates: expected 'single', 'simple', 'ensemble'"):
        resolve_templates("many")
    with pytest.raises(ValueError, match=r"templates\[1\]: expected a string containing '\{c\}'"):
        resolve_templates(["a {c}", "no placeholder"])


def test_class_names_from_a_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\ncat\n\n  golden retriever  \ndog{1}\n", encoding="utf-8")
    assert resolve_classes(f) == ("cat", "golden retriever", "dog{1}")
    assert resolve_classes(str(f)) == resolve_classes(f)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no class names"):
        resolve_classes(empty)
    with pytest.raises(ValueError, match="'nope.txt', which is not an existing file"):
        resolve_classes("nope.txt")


def test_class_names_from_a_list_and_imagenet():
    names = resolve_classes("ImageNet")
    assert len(names) == 1000 and names[0] == "tench"
    assert resolve_classes([" cat ", "dog"]) == ("cat", "dog")
    with pytest.raises(ValueError, match="at least one class name"):
        resolve_classes([])
    with pytest.raises(ValueError, match=r"classes\[1\]: expected a non-empty string, got ''"):
        resolve_classes(["cat", ""])
    with pytest.raises(TypeError, match="classes: expected 'imagenet'"):
        resolve_classes(42)


def test_braces_in_class_names_are_kept(teacher, monkeypatch):
    teacher.clear_text_cache()
    calls = _counting(teacher, monkeypatch)
    teacher.class_embeddings(["{weird} name"])
    assert calls == [["a photo of a {weird} name."]]
