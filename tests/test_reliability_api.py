"""Python API types: wrong types are refused with the argument's name (never coerced); duplicate
user class names are refused."""
import re

import numpy as np
import pytest
import torch

from apm_fast import APMConfig, preset
from apm_fast.teachers import imagenet_classnames, resolve_classes
from apm_fast.validation import check_training


# ---------------------------------------------------------------- APMConfig
@pytest.mark.parametrize("field, value", [
    ("pool", "False"), ("pool", 1), ("pool", None), ("rgb_head", "yes"), ("rgb_head", 0),
])
def test_config_flags_must_be_bools(field, value):
    with pytest.raises(TypeError, match=f"{field}: expected True or False, got {value!r}"):
        APMConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("hidden", ("64", 32), r"hidden\[0\]: expected a positive integer, got '64'"),
    ("hidden", (64.7, 32), r"hidden\[0\]: expected a positive integer, got 64.7"),
    ("hidden", (64, True), r"hidden\[1\]: expected a positive integer, got True"),
    ("hidden", "64", r"hidden: expected a tuple or list of MLP widths, got '64'"),
    ("hidden", 64, r"hidden: expected a tuple or list of MLP widths, got 64"),
    ("grid", 4.0, r"grid: expected a positive integer, got 4.0"),
    ("init_std", "0.01", r"init_std: expected a positive finite number, got '0.01'"),
    ("init_std", True, r"init_std: expected a positive finite number, got True"),
    ("init_std", float("inf"), r"init_std: expected a positive finite number, got inf"),
    ("init", 1, r"init: expected one of \('authors', 'pytorch'\), got 1"),
])
def test_config_numbers_are_not_coerced(field, value, message):
    with pytest.raises((TypeError, ValueError), match=message):
        APMConfig(**{field: value})


def test_config_accepts_numpy_integers_and_stores_python_ints():
    cfg = APMConfig(grid=np.int64(4), patch=np.int32(2), hidden=[np.int64(8), 4], dim=np.int64(8),
                    heads=2, init_std=np.float32(0.02))
    assert cfg.grid == 4 and type(cfg.grid) is int and type(cfg.patch) is int
    assert cfg.hidden == (8, 4) and all(type(h) is int for h in cfg.hidden)
    assert type(cfg.init_std) is float and cfg.to_dict()["hidden"] == [8, 4]
    assert APMConfig.from_dict(cfg.to_dict()) == cfg


def test_config_from_dict_refuses_non_dicts_and_wrong_types():
    with pytest.raises(TypeError, match="config: expected a dict of APMConfig fields, got list"):
        APMConfig.from_dict([1, 2])
    d = preset("ttt-b16").to_dict()
    d["pool"] = "False"
    with pytest.raises(TypeError, match="pool: expected True or False"):
        APMConfig.from_dict(d)


# ---------------------------------------------------------------- training settings
def test_check_training_takes_numpy_scalars_and_refuses_other_types():
    check_training(steps=np.int64(3), lr=np.float32(1e-3), betas=(np.float64(0.9), 0.999), eps=1e-8,
                   students=np.int32(2))
    with pytest.raises(ValueError, match="steps: expected a positive integer, got 3.0"):
        check_training(steps=3.0, lr=1e-3)
    with pytest.raises(ValueError, match="lr: expected a positive finite number, got '0.1'"):
        check_training(steps=3, lr="0.1")


# ---------------------------------------------------------------- class names
def test_duplicate_class_names_in_a_list_are_refused():
    with pytest.raises(ValueError, match=r"classes: 'cat' occurs twice \(classes\[0\] and classes\[2\]\)"):
        resolve_classes(["cat", "dog", " cat "])


def test_duplicate_class_names_in_a_file_are_refused(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# pets\ncat\ndog\n\ncat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"classes.txt'.*'cat' occurs twice \(lines 2 and 5\)"):
        resolve_classes(f)


def test_the_builtin_imagenet_list_keeps_its_two_known_duplicates():
    names = resolve_classes("imagenet")
    assert names == imagenet_classnames() and len(names) == 1000
    assert sorted(n for n in set(names) if names.count(n) > 1) == ["missile", "sunglasses"]


def test_the_builtin_imagenet_list_passes_as_a_list_and_other_repeats_are_refused():
    """ImageNet's list repeats two names ('missile', 'sunglasses': distinct classes). Given by
    name or passed on as the list itself (the evaluation's ImageNet sets do) it is accepted, in
    label order; the same list with one more repeat, or any user list with a repeat, is not."""
    names = imagenet_classnames()
    assert len(set(names)) < len(names)
    assert resolve_classes(list(names)) == names == resolve_classes("imagenet")
    tampered = list(names)
    tampered[1] = tampered[0]
    with pytest.raises(ValueError, match=r"classes\[0\] and classes\[1\]"):
        resolve_classes(tampered)


# ---------------------------------------------------------------- public helpers' arguments
def test_position_code_refuses_what_is_not_a_positive_integer():
    import numpy as np

    from apm_fast import position_code

    for args, message in (((-4, 4), "d: expected a positive integer, got -4"),
                          ((8.9, 2), "d: expected a positive integer, got 8.9"),
                          (("8", 2), "d: expected a positive integer, got '8'"),
                          ((0, 4), "d: expected a positive integer, got 0"),
                          ((8, 2, 0), "width: expected a positive integer, got 0")):
        with pytest.raises(ValueError, match=message):
            position_code(*args)
    assert torch.equal(position_code(np.int64(8), np.int64(3)), position_code(8, 3))


def test_preset_and_trainer_name_what_they_expected():
    import torch.nn as nn

    from apm_fast import TestTimeTrainer, preset

    with pytest.raises(ValueError, match=r"preset: unknown name \['ttt-b16'\]; expected one of"):
        preset(["ttt-b16"])
    with pytest.raises(TypeError, match="model: expected an apm_fast.APM, got Linear"):
        TestTimeTrainer(nn.Linear(2, 2))


def test_classify_names_a_bad_in_memory_image_once(tmp_path):
    from apm_fast import APM, TestTimeTrainer, classify
    from tiny_clip import TINY_DIM, random_teacher, write_config

    model = APM(preset("ttt-b16", grid=4, patch=4, hidden=(16,), dim=TINY_DIM, heads=2))
    with pytest.raises(ValueError) as info:
        classify(TestTimeTrainer(model, steps=1), [torch.zeros(3, 20, 30, dtype=torch.int64)],
                 random_teacher(write_config(tmp_path)), ["cat", "dog"], progress=False)
    assert str(info.value).count("images[0]") == 1, str(info.value)


def test_class_names_that_make_the_same_prompt_are_repeats_and_a_bom_is_not_a_name(tmp_path):
    for names, second in ((["Cat", "dog", "cat"], "'cat' occurs twice (classes[0] and classes[2], as 'Cat')"),
                          (["sea lion", "sea  lion"], "'sea  lion' occurs twice"),
                          (["caf\u00e9", "cafe\u0301"], "occurs twice")):
        with pytest.raises(ValueError, match=re.escape(second)):
            resolve_classes(names)
    f = tmp_path / "windows.txt"
    f.write_bytes("\ufeffcat\r\ndog\r\n".encode("utf-8"))
    assert resolve_classes(f) == ("cat", "dog")
    f.write_bytes("\ufeffcat\r\ncat\r\n".encode("utf-8"))
    with pytest.raises(ValueError, match=r"'cat' occurs twice \(lines 1 and 2\)"):
        resolve_classes(f)
