"""The teacher: OpenAI TorchScript archives as local checkpoints; class embeddings cached on disk
(real weights only), atomically, with a progress bar on a terminal; the 'simple' templates."""
import os
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch

from apm_fast._compat import import_open_clip
from apm_fast.teachers import OpenCLIPTeacher, RandomWeightsWarning, resolve_templates
from apm_fast.teachers.base import TextCacheWarning
from tiny_clip import TINY_NAME, counting_text_calls as _counting, random_teacher


@pytest.fixture(scope="module")
def source(config_path):
    """The tiny teacher whose weights the files below hold."""
    return random_teacher(config_path, seed=3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("APM_FAST_CACHE", str(root))
    return root


# ---------------------------------------------------------------- item 6: TorchScript archives
class _Archive(torch.nn.Module):
    """A stand-in for OpenAI's CLIP .pt: a TorchScript module whose state_dict holds the CLIP
    weights in half precision, plus the three integer entries open_clip drops."""

    def __init__(self, sd):
        super().__init__()
        for key, value in sd.items():
            *path, leaf = key.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_buffer(leaf, value)

    def forward(self, x):
        return x


def _write_archive(path, sd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # torch.jit.script, deprecated
        torch.jit.script(_Archive(sd)).save(str(path))
    return path


def test_an_openai_torchscript_archive_loads(source, tmp_path):
    oc = import_open_clip()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in source.model.state_dict().items()}
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
             "vocab_size": torch.tensor(49408)}
    path = _write_archive(tmp_path / "ViT-tiny.pt", {**half, **extra})
    teacher = OpenCLIPTeacher(TINY_NAME, path, device="cpu")
    assert not teacher.random_weights and teacher.pretrained == str(path)
    loaded = teacher.model.state_dict()
    for k, v in half.items():
        assert torch.equal(loaded[k], v.to(loaded[k].dtype)), k
    # OpenAI's models were trained with QuickGELU: an archive is built with it (as open_clip's
    # 'openai' tags are), and then embeds exactly like open_clip's own model with those weights
    block = teacher.model.transformer.resblocks[0].mlp
    assert any(isinstance(m, oc.transformer.QuickGELU) for m in block.modules())
    ref = oc.create_model(TINY_NAME, force_quick_gelu=True)
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    tokens = teacher.tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(teacher.embed_texts(["a photo of a cat.", "a dog"]), ref.eval().encode_text(tokens))


def test_a_torchscript_archive_of_another_model_is_one_line(config_path, tmp_path):
    path = _write_archive(tmp_path / "other.pt", {"encoder.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"other.pt'.* TorchScript archive .*'encoder.weight'") as info:
        OpenCLIPTeacher(str(config_path), path, device="cpu")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


# ---------------------------------------------------------------- item 8: the disk cache
@pytest.fixture
def ckpt(source, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    return path


def _files(root):
    return sorted(p.name for p in (root / "text").iterdir()) if (root / "text").is_dir() else []


def test_class_embeddings_are_cached_on_disk_for_real_weights(config_path, ckpt, cache, monkeypatch):
    first = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    e1 = first.class_embeddings(["cat", "dog", "bird"], "simple")
    (name,) = _files(cache)
    assert name.endswith(".safetensors")                  # no temporary file left beside it
    second = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    calls = _counting(second, monkeypatch)
    e2 = second.class_embeddings(["cat", "dog", "bird"], "simple")
    assert calls == [] and torch.equal(e1, e2)
    assert torch.equal(second.class_embeddings(["cat", "dog", "bird"], "simple"), e2) and calls == []
    second.class_embeddings(["cat", "dog", "bird"], "single")                 # other templates: computed
    second.class_embeddings(["cat", "dog"], "simple")                         # other classes: computed
    assert len(calls) == 1 + 7 and len(_files(cache)) == 3


def test_a_changed_checkpoint_file_is_not_served_from_the_cache(config_path, ckpt, cache, monkeypatch):
    OpenCLIPTeacher(str(config_path), ckpt, device="cpu").class_embeddings(["cat", "dog"])
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))     # the same path, rewritten
    again = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    calls = _counting(again, monkeypatch)
    again.class_embeddings(["cat", "dog"])
    assert [len(c) for c in calls] == [2]


def test_a_replaced_checkpoint_of_the_same_size_and_time_is_not_served_from_the_cache(config_path, ckpt, cache,
                                                                                       monkeypatch, tmp_path):
    """cp -p / rsync -t / tar x can leave a new file with the old one's size and modification
    time: the cache still sees a different file (its change time, which no copy can set)."""
    import shutil
    import time

    OpenCLIPTeacher(str(config_path), ckpt, device="cpu").class_embeddings(["cat", "dog"])
    assert stat.S_IMODE(os.stat(cache / "text" / _files(cache)[0]).st_mode) == 0o666 & ~_umask()   # readable by all
    st = os.stat(ckpt)
    time.sleep(0.01)
    shutil.copyfile(ckpt, tmp_path / "copy.pt")
    os.replace(tmp_path / "copy.pt", ckpt)                      # the same bytes, size and path
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))         # and the same modification time
    again = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    calls = _counting(again, monkeypatch)
    again.class_embeddings(["cat", "dog"])
    assert [len(c) for c in calls] == [2]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_local_folder_model_says_its_weights_are_its_own(config_path, ckpt, tmp_path):
    """local-dir: (and hf-hub:) models load the weights their folder holds: not announced as
    random, and another checkpoint for them is refused rather than silently ignored."""
    import json as _json
    import shutil

    folder = tmp_path / "clip"
    folder.mkdir()
    cfg = _json.loads(Path(config_path).read_text())
    (folder / "open_clip_config.json").write_text(_json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    shutil.copyfile(ckpt, folder / "open_clip_pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        teacher = OpenCLIPTeacher(f"local-dir:{folder}", None, device="cpu")
    assert teacher.random_weights is False and "RANDOM" not in repr(teacher)
    want = OpenCLIPTeacher(str(config_path), ckpt, device="cpu").class_embeddings(["cat", "dog"])
    torch.testing.assert_close(teacher.class_embeddings(["cat", "dog"]), want)
    with pytest.raises(ValueError, match="loads the weights of its own repository or folder"):
        OpenCLIPTeacher(f"local-dir:{folder}", ckpt, device="cpu")


def test_random_weights_are_never_cached_on_disk(config_path, cache, monkeypatch):
    teacher = random_teacher(config_path, seed=11)
    teacher.class_embeddings(["cat", "dog"])
    assert teacher.weights_id() is None and _files(cache) == []


def test_a_corrupt_cache_file_is_recomputed(config_path, ckpt, cache, monkeypatch):
    e1 = OpenCLIPTeacher(str(config_path), ckpt, device="cpu").class_embeddings(["cat", "dog"])
    (name,) = _files(cache)
    (cache / "text" / name).write_bytes(b"\x00garbage")
    again = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    calls = _counting(again, monkeypatch)
    torch.testing.assert_close(again.class_embeddings(["cat", "dog"]), e1)
    assert [len(c) for c in calls] == [2] and (cache / "text" / name).stat().st_size > 100     # rewritten


def test_an_unwritable_cache_warns_and_goes_on(config_path, ckpt, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("APM_FAST_CACHE", str(blocker))
    teacher = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    with pytest.warns(TextCacheWarning, match="not cached on disk"):
        emb = teacher.class_embeddings(["cat", "dog"])
    assert emb.shape == (2, teacher.dim)


def test_the_cache_can_be_switched_off_and_is_dropped_with_clear_text_cache(config_path, ckpt, cache, monkeypatch):
    monkeypatch.setenv("APM_FAST_CACHE", "off")
    OpenCLIPTeacher(str(config_path), ckpt, device="cpu").class_embeddings(["cat", "dog"])
    assert not cache.exists()
    monkeypatch.setenv("APM_FAST_CACHE", str(cache))
    teacher = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    teacher.clear_text_cache()            # "the weights changed": their file no longer names them
    teacher.class_embeddings(["cat", "dog"])
    assert _files(cache) == []


def test_a_progress_bar_only_on_a_terminal(config_path, ckpt, cache, capsys, monkeypatch):
    teacher = OpenCLIPTeacher(str(config_path), ckpt, device="cpu")
    teacher.class_embeddings(["cat", "dog"], "simple")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    teacher.class_embeddings(["fish", "dog"], "simple")
    assert "text embeddings" in capsys.readouterr().err


# ---------------------------------------------------------------- the 'simple' templates
def test_simple_templates_are_the_seven_selected_by_the_clip_authors():
    temps = resolve_templates("simple")
    assert temps == ("itap of a {c}.", "a bad photo of the {c}.", "a origami {c}.", "a photo of the large {c}.",
                     "a {c} in a video game.", "art of the {c}.", "a photo of the small {c}.")
    shipped = import_open_clip().zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES
    assert temps == tuple(t("{c}") for t in shipped)


class _NotWeights:
    """A Python object in a checkpoint: torch.load(weights_only=True) refuses it."""


def test_teacher_checkpoint_errors_are_one_short_line(source, config_path, tmp_path):
    sd = dict(source.model.state_dict())
    sd.pop("logit_scale")
    sd.update({f"extra.{i}": torch.zeros(1) for i in range(9)})
    torch.save(sd, tmp_path / "wrong_keys.pt")
    with pytest.raises(ValueError, match=r"wrong_keys.pt'.*missing 1 key: 'logit_scale'; unexpected 9 keys: "
                                         r"'extra.0', .* \(\+4 more\)") as info:
        OpenCLIPTeacher(str(config_path), tmp_path / "wrong_keys.pt", device="cpu")
    assert "\n" not in str(info.value) and len(str(info.value)) < 500
    torch.save({"w": torch.zeros(1), "o": _NotWeights()}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match=r"objects.pt'.*not a weights-only checkpoint.*_NotWeights") as info:
        OpenCLIPTeacher(str(config_path), tmp_path / "objects.pt", device="cpu")
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_of_another_architecture_is_named_as_such(source, config_path, tmp_path):
    """Weights of another width: the file is read fine, its weights do not fit (not 'unreadable')."""
    import json as _json

    from tiny_clip import TINY_CONFIG

    other = dict(TINY_CONFIG, text_cfg=dict(TINY_CONFIG["text_cfg"], width=48, heads=3))
    wide = tmp_path / "apm-test-wide-clip.json"
    wide.write_text(_json.dumps(other))
    torch.save(random_teacher(wide, seed=2).model.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide.pt'.*its weights do not fit this model") as info:
        OpenCLIPTeacher(str(config_path), tmp_path / "wide.pt", device="cpu")
    assert "not a readable" not in str(info.value) and "\n" not in str(info.value)
