"""apm_fast.datasets: the dataset layer of ``apm-fast eval``, on synthetic roots built here.

Every root is made of empty class folders plus a few tiny real images (PNG/JPEG bytes made with
PIL once per session): the loader never opens an image, so only the layout matters. The known
facts checked below were read from the public sources named next to them.
"""
import io
import json
import os
import random

import pytest
from PIL import Image

from apm_fast import datasets as ds
from apm_fast.datasets import DatasetError, load_dataset

FINE_GRAINED = ("flowers102", "dtd", "oxford-pets", "stanford-cars", "ucf101", "caltech101",
                "food101", "sun397", "fgvc-aircraft", "eurosat")


@pytest.fixture(scope="session")
def image_bytes():
    """A tiny PNG and a tiny JPEG, made once."""
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


def _write(path, data=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _class_folders(folder, names, image_bytes, with_images=(), per_class=2):
    """One (empty) folder per name; ``per_class`` JPEGs in those listed in ``with_images``."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    paths = []
    for name in with_images:
        for k in range(per_class):
            paths.append(_write(os.path.join(folder, name, f"img_{k}.JPEG"), image_bytes["JPEG"]))
    return sorted(paths)


# ---------------------------------------------------------------------------------------------
# package data and known facts
# ---------------------------------------------------------------------------------------------

def test_package_wnids():
    all_w = ds.imagenet_wnids()
    assert len(all_w) == 1000 and len(set(all_w)) == 1000
    assert list(all_w) == sorted(all_w)  # the standard order is the sorted order
    # first / last wnid of the standard list (hendrycks/imagenet-r eval.py all_wnids, TPT
    # data/imagenet_variants.py all_wnids)
    assert all_w[0] == "n01440764" and all_w[-1] == "n15075141"
    for subset in ("imagenet-a", "imagenet-r"):
        sub = ds.imagenet_wnids(subset)
        assert len(sub) == 200 and len(set(sub)) == 200
        assert set(sub) <= set(all_w)
        idx = ds.imagenet_subset_indices(subset)
        assert list(idx) == sorted(idx) and [all_w[i] for i in idx] == list(sub)
    # ImageNet-A: the first classes of hendrycks/natural-adv-examples eval.py thousand_k_to_200
    # are 1000-way indices 6, 11, 13, 15, 17 (-> 0, 1, 2, 3, 4); n01498041 is index 6
    assert ds.imagenet_subset_indices("imagenet-a")[:5] == (6, 11, 13, 15, 17)
    assert ds.imagenet_wnids("imagenet-a")[0] == "n01498041"
    # ImageNet-R: imagenet_r_wnids of hendrycks/imagenet-r eval.py, in sorted order
    assert ds.imagenet_wnids("imagenet-r")[:4] == ("n01443537", "n01484850", "n01494475", "n01498041")
    assert ds.imagenet_subset_indices("imagenet-r")[:4] == (1, 2, 4, 6)
    with pytest.raises(DatasetError, match="subset"):
        ds.imagenet_wnids("imagenet-x")


def test_imagenet_classnames_and_templates():
    names = ds.imagenet_classnames()
    assert len(names) == 1000
    assert names[0] == "tench" and names[6] == "stingray" and names[1] == "goldfish"
    # the CLIP names repeat two names: labels must be indices, never names
    dup = {n for n in names if names.count(n) > 1}
    assert dup == {"missile", "sunglasses"}
    a_names = [names[i] for i in ds.imagenet_subset_indices("imagenet-a")]
    assert a_names[0] == "stingray"

    t = ds.dataset_templates("imagenet")
    assert len(t) == 80 and len(set(t)) == 80
    assert t[0] == "a bad photo of a {c}." and t[-1] == "a tattoo of the {c}."
    from apm_fast._compat import import_open_clip
    assert list(t) == [f("{c}") for f in import_open_clip().OPENAI_IMAGENET_TEMPLATES]
    for variant in ("imagenet-a", "imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-c",
                    "folder"):
        assert ds.dataset_templates(variant) == t
    assert ds.dataset_templates("imagenet", "coop") == ("a photo of a {c}.",)


def test_fine_grained_templates():
    for dataset_id in FINE_GRAINED:
        for style in ("clip", "coop"):
            t = ds.dataset_templates(dataset_id, style)
            assert len(t) >= 1, (dataset_id, style)
            assert all("{c}" in x and "{}" not in x for x in t), (dataset_id, style)
            assert all(x.format(c="X") for x in t)
    # openai/CLIP data/prompts.md and CoOp trainers/zsclip.py CUSTOM_TEMPLATES
    assert ds.dataset_templates("flowers102") == ("a photo of a {c}, a type of flower.",)
    assert ds.dataset_templates("food101") == ("a photo of {c}, a type of food.",)
    assert len(ds.dataset_templates("ucf101")) == 48
    assert len(ds.dataset_templates("caltech101")) == 34
    assert ds.dataset_templates("dtd", "coop") == ("{c} texture.",)
    assert ds.dataset_templates("eurosat", "coop") == ("a centered satellite photo of {c}.",)
    with pytest.raises(DatasetError, match="style"):
        ds.dataset_templates("dtd", "fancy")


def test_registry():
    assert tuple(ds.DATASETS) == (
        "imagenet", "imagenet-a", "imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-c",
        "flowers102", "dtd", "oxford-pets", "stanford-cars", "ucf101", "caltech101", "food101",
        "sun397", "fgvc-aircraft", "eurosat", "folder")
    counts = {k: s.num_classes for k, s in ds.DATASETS.items()}
    assert counts == {"imagenet": 1000, "imagenet-a": 200, "imagenet-v2": 1000, "imagenet-r": 200,
                      "imagenet-sketch": 1000, "imagenet-c": 1000, "flowers102": 102, "dtd": 47,
                      "oxford-pets": 37, "stanford-cars": 196, "ucf101": 101, "caltech101": 100,
                      "food101": 101, "sun397": 397, "fgvc-aircraft": 100, "eurosat": 10,
                      "folder": None}
    assert len(ds.IMAGENET_C_CORRUPTIONS) == 15
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet-x'.*imagenet-a"):
        load_dataset("/", "imagenet-x")


# ---------------------------------------------------------------------------------------------
# ImageNet layouts
# ---------------------------------------------------------------------------------------------

def test_imagenet(tmp_path, image_bytes):
    wnids = ds.imagenet_wnids()
    folder = tmp_path / "imagenet" / "val"
    expected = _class_folders(folder, wnids, image_bytes, with_images=(wnids[0], wnids[999]))
    # not classes / not items: a README, a stray folder, a hidden folder, a text file, an image
    # with a lower-case extension (counts), a FIFO and a broken symlink (skipped)
    _write(folder / "README.txt", b"x")
    os.makedirs(folder / "not_a_class")
    _write(folder / "not_a_class" / "x.jpg", image_bytes["JPEG"])
    os.makedirs(folder / ".cache")
    _write(folder / wnids[0] / "notes.txt", b"x")
    expected.append(_write(folder / wnids[0] / "extra.png", image_bytes["PNG"]))
    os.mkfifo(folder / wnids[0] / "pipe.jpg")
    os.symlink(folder / "nowhere.jpg", folder / wnids[0] / "dangling.jpg")
    expected.sort()

    s = load_dataset(tmp_path, "imagenet")
    assert s.id == "imagenet" and s.root == str(folder) and s.num_classes == 1000
    assert s.classnames == ds.imagenet_classnames()
    assert len(s.templates) == 80
    assert [p for p, _ in s.items] == expected
    by_folder = {os.path.basename(os.path.dirname(p)): y for p, y in s.items}
    assert by_folder == {wnids[0]: 0, wnids[999]: 999}
    assert s.classnames[s.items[0][1]] == "tench"
    assert len(s) == s.num_total == 5


def test_imagenet_tpt_spelling(tmp_path, image_bytes):
    wnids = ds.imagenet_wnids()
    _class_folders(tmp_path / "ImageNet" / "val", wnids, image_bytes, with_images=(wnids[5],))
    s = load_dataset(str(tmp_path), "imagenet")
    assert s.root == str(tmp_path / "ImageNet" / "val") and {y for _, y in s.items} == {5}


@pytest.mark.parametrize("subset,folder", [("imagenet-a", "imagenet-a"),
                                           ("imagenet-a", "imagenet-adversarial/imagenet-a"),
                                           ("imagenet-r", "imagenet-r")])
def test_imagenet_a_r(tmp_path, image_bytes, subset, folder):
    wnids = ds.imagenet_wnids(subset)
    _class_folders(tmp_path / folder, wnids, image_bytes, with_images=(wnids[0], wnids[-1]))
    _write(tmp_path / folder / "README.txt", b"x")  # ImageNet-A ships one next to the classes
    s = load_dataset(tmp_path, subset)
    assert s.id == subset and s.num_classes == 200
    names = ds.imagenet_classnames()
    assert s.classnames == tuple(names[i] for i in ds.imagenet_subset_indices(subset))
    assert {y for _, y in s.items} == {0, 199}
    for path, label in s.items:
        assert os.path.basename(os.path.dirname(path)) == wnids[label]
    if subset == "imagenet-a":
        assert s.classnames[0] == "stingray"
    else:
        assert s.classnames[0] == "goldfish"


def test_imagenet_v2_numeric_folders(tmp_path, image_bytes):
    folder = tmp_path / "imagenetv2-matched-frequency-format-val"
    numbers = [str(k) for k in range(1000)]
    _class_folders(folder, numbers, image_bytes, with_images=("2", "10", "999"), per_class=1)
    s = load_dataset(tmp_path, "imagenet-v2")
    labels = {os.path.basename(os.path.dirname(p)): y for p, y in s.items}
    assert labels == {"2": 2, "10": 10, "999": 999}
    # sorted-string order ("0", "1", "10", "100", ...) would have given folder "10" label 2
    assert sorted(numbers).index("10") == 2
    assert s.classnames == ds.imagenet_classnames() and s.classnames[10] == "brambling"


@pytest.mark.parametrize("folder", ["imagenet-sketch", "ImageNet-Sketch/sketch"])
def test_imagenet_sketch(tmp_path, image_bytes, folder):
    wnids = ds.imagenet_wnids()
    _class_folders(tmp_path / folder, wnids, image_bytes, with_images=(wnids[1],))
    s = load_dataset(tmp_path, "imagenet-sketch")
    assert s.root == str(tmp_path / folder) and {y for _, y in s.items} == {1}
    assert s.classnames[1] == "goldfish"


def test_imagenet_sketch_coop_nesting(tmp_path, image_bytes):
    """CoOp's imagenet-sketch/images: the outer folder exists but holds no wnids, the inner one wins."""
    wnids = ds.imagenet_wnids()
    _write(tmp_path / "imagenet-sketch" / "classnames.txt", b"x")
    _class_folders(tmp_path / "imagenet-sketch" / "images", wnids, image_bytes, with_images=(wnids[3],))
    s = load_dataset(tmp_path, "imagenet-sketch")
    assert s.root == str(tmp_path / "imagenet-sketch" / "images") and len(s) == 2


def test_imagenet_c(tmp_path, image_bytes):
    wnids = ds.imagenet_wnids()
    _class_folders(tmp_path / "imagenet-c" / "fog" / "3", wnids, image_bytes, with_images=(wnids[7],))
    os.makedirs(tmp_path / "imagenet-c" / "fog" / "5")
    s = load_dataset(tmp_path, "imagenet-c", corruption="fog", severity=3)
    assert s.id == "imagenet-c/fog/3" and s.root == str(tmp_path / "imagenet-c" / "fog" / "3")
    assert {y for _, y in s.items} == {7} and s.num_classes == 1000 and len(s.templates) == 80

    with pytest.raises(DatasetError, match=r"severity 4; present severities: 3, 5"):
        load_dataset(tmp_path, "imagenet-c", corruption="fog", severity=4)
    with pytest.raises(DatasetError, match=r"corruption 'snow'; present corruptions: fog"):
        load_dataset(tmp_path, "imagenet-c", corruption="snow", severity=3)


def test_imagenet_c_arguments(tmp_path):
    with pytest.raises(DatasetError, match=r"needs corruption \(--corruption\).*gaussian_noise"):
        load_dataset(tmp_path, "imagenet-c", severity=3)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "imagenet-c", corruption="gaussian", severity=3)
    msg = str(err.value)
    assert "unknown corruption (--corruption) 'gaussian'" in msg
    assert all(c in msg for c in ds.IMAGENET_C_CORRUPTIONS)
    with pytest.raises(DatasetError, match=r"needs severity \(--severity\)"):
        load_dataset(tmp_path, "imagenet-c", corruption="fog")
    for bad in (0, 6, "3", 2.0, True):
        with pytest.raises(DatasetError,
                           match=rf"severity \(--severity\) must be an integer 1..5, got {bad!r}"):
            load_dataset(tmp_path, "imagenet-c", corruption="fog", severity=bad)
    with pytest.raises(DatasetError, match=r"corruption \(--corruption\) applies only to imagenet-c"):
        load_dataset(tmp_path, "imagenet", corruption="fog")
    with pytest.raises(DatasetError, match=r"severity \(--severity\) applies only to imagenet-c"):
        load_dataset(tmp_path, "imagenet", severity=1)


# ---------------------------------------------------------------------------------------------
# CoOp layouts
# ---------------------------------------------------------------------------------------------

def _coop_root(tmp_path, image_bytes, folder, image_dir, split_name, names, test_per_class=1):
    """A CoOp dataset folder: every class named in train, ``test_per_class`` test images per class
    for the first three classes, with their files under ``image_dir``."""
    base = tmp_path / folder
    img_root = base / image_dir if image_dir else base
    train = [[f"{n}/train_{i}.jpg", i, n] for i, n in enumerate(names)]  # never checked on disk
    test = []
    for i, n in enumerate(names[:3]):
        for k in range(test_per_class):
            rel = f"{n}/test_{k}.jpg"
            _write(img_root / rel, image_bytes["JPEG"])
            test.append([rel, i, n])
    test.reverse()  # the split's order is kept, not re-sorted
    _write(base / f"split_zhou_{split_name}.json",
           json.dumps({"train": train, "val": train[:2], "test": test}).encode())
    return base, img_root, test


def test_flowers102_split(tmp_path, image_bytes):
    names = [f"flower_{i}" for i in range(102)]
    base, img_root, test = _coop_root(tmp_path, image_bytes, "oxford_flowers", "jpg", "OxfordFlowers",
                                      names, test_per_class=2)
    s = load_dataset(tmp_path, "flowers102")
    assert s.id == "flowers102" and s.root == str(base) and s.num_classes == 102
    assert s.classnames[0] == "flower 0"  # underscores as spaces, as CoOp/TPT prompt them
    assert s.items == tuple((str(img_root / rel), y) for rel, y, _ in test)
    assert s.templates == ("a photo of a {c}, a type of flower.",)


def test_dtd_and_eurosat_split(tmp_path, image_bytes):
    dtd_names = [f"texture{i}" for i in range(47)]
    _coop_root(tmp_path, image_bytes, "dtd", "images", "DescribableTextures", dtd_names)
    s = load_dataset(tmp_path, "dtd")
    assert s.num_classes == 47 and len(s) == 3 and len(s.templates) == 8

    euro = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
            "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
            "River", "Sea or Lake"]
    base, img_root, _ = _coop_root(tmp_path, image_bytes, "eurosat", "2750", "EuroSAT", euro)
    s = load_dataset(tmp_path, "eurosat")
    assert s.classnames == tuple(euro) and all(p.startswith(str(img_root)) for p, _ in s.items)


def test_stanford_cars_image_root_is_folder(tmp_path, image_bytes):
    names = [f"2012 Car {i}" for i in range(196)]
    base = tmp_path / "stanford_cars"
    test = [[f"cars_test/{k:05d}.jpg", k, names[k]] for k in range(3)]
    for rel, _, _ in test:
        _write(base / rel, image_bytes["JPEG"])
    split = {"train": [["cars_train/x.jpg", i, n] for i, n in enumerate(names)], "val": [], "test": test}
    _write(base / "split_zhou_StanfordCars.json", json.dumps(split).encode())
    s = load_dataset(tmp_path, "stanford-cars")
    assert [p for p, _ in s.items] == [str(base / rel) for rel, _, _ in test]
    assert [y for _, y in s.items] == [0, 1, 2]


def test_split_in_tpt_data_splits_and_zero_images(tmp_path, image_bytes):
    """TPT keeps the split json apart (data_splits/); ZERO keeps the images under images/."""
    names = [f"food_{i}" for i in range(101)]
    base, img_root, test = _coop_root(tmp_path, image_bytes, "food101", "images", "Food101", names)
    os.makedirs(tmp_path / "data_splits")
    os.rename(base / "split_zhou_Food101.json", tmp_path / "data_splits" / "split_zhou_Food101.json")
    s = load_dataset(tmp_path, "food101")
    assert s.root == str(base) and s.items[0][0] == str(img_root / test[0][0])


def test_fgvc_aircraft_text_files(tmp_path, image_bytes):
    base = tmp_path / "fgvc_aircraft"
    variants = [f"A3{i:02d}" for i in range(98)] + ["F-16A/B", "Boeing 717"]
    _write(base / "variants.txt", ("\n".join(variants) + "\n").encode())
    lines = ["1025794 Boeing 717", "1340192 F-16A/B", "0056978 A300"]
    _write(base / "images_variant_test.txt", ("\n".join(lines) + "\n").encode())
    for line in lines:
        _write(base / "images" / f"{line.split(' ')[0]}.jpg", image_bytes["JPEG"])
    s = load_dataset(tmp_path, "fgvc-aircraft")
    assert s.classnames == tuple(variants) and s.num_classes == 100
    assert s.items == ((str(base / "images" / "1025794.jpg"), 99),
                       (str(base / "images" / "1340192.jpg"), 98),
                       (str(base / "images" / "0056978.jpg"), 0))
    assert s.templates == ("a photo of a {c}, a type of aircraft.",
                           "a photo of the {c}, a type of aircraft.")

    _write(base / "images_variant_test.txt", b"1025794 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"line 1 .*'Boeing 999' is not in variants.txt"):
        load_dataset(tmp_path, "fgvc-aircraft")


# ---------------------------------------------------------------------------------------------
# a user ImageFolder
# ---------------------------------------------------------------------------------------------

def test_folder_with_classes_file(tmp_path, image_bytes):
    root = tmp_path / "mine"
    paths = _class_folders(root, ["b_dog", "a_cat", "c_eel"], image_bytes,
                           with_images=("a_cat", "b_dog", "c_eel"))
    _write(root / "README.md", b"x")
    os.makedirs(root / ".ipynb_checkpoints")
    os.makedirs(root / "a_cat" / "nested")
    paths.append(_write(root / "a_cat" / "nested" / "deep.webp", image_bytes["PNG"]))
    classes = _write(tmp_path / "classes.txt", b"cat\ndog\neel\n\n")
    s = load_dataset(root, "folder", classes_file=classes)
    assert s.id == "folder" and s.classnames == ("cat", "dog", "eel")
    assert [p for p, _ in s.items] == sorted(paths)
    for path, label in s.items:
        assert path.split(os.sep)[len(str(root).split(os.sep))] == ["a_cat", "b_dog", "c_eel"][label]
    assert len(s.templates) == 80

    with pytest.raises(DatasetError, match=r"needs classes_file \(--classes FILE\)"):
        load_dataset(root, "folder")
    two = _write(tmp_path / "two.txt", b"cat\ndog\n")
    with pytest.raises(DatasetError,
                       match=r"has 2 names but .* has 3 class folders \(a_cat, b_dog, c_eel\)"):
        load_dataset(root, "folder", classes_file=two)
    dup = _write(tmp_path / "dup.txt", b"cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match=r"repeats class names: 'cat' \(lines 1 and 3\)"):
        load_dataset(root, "folder", classes_file=dup)
    gap = _write(tmp_path / "gap.txt", b"cat\n\neel\n")
    with pytest.raises(DatasetError, match=r"blank lines \(line 2\)"):
        load_dataset(root, "folder", classes_file=gap)
    with pytest.raises(DatasetError, match=r"classes_file \(--classes\) .*missing.txt' does not exist"):
        load_dataset(root, "folder", classes_file=tmp_path / "missing.txt")
    with pytest.raises(DatasetError, match=r"classes_file \(--classes\) applies only to 'folder'"):
        load_dataset(root, "imagenet", classes_file=classes)


# ---------------------------------------------------------------------------------------------
# limit
# ---------------------------------------------------------------------------------------------

def test_limit_is_a_seeded_shuffle(tmp_path, image_bytes):
    root = tmp_path / "mine"
    names = [f"c{i:02d}" for i in range(20)]
    _class_folders(root, names, image_bytes, with_images=names, per_class=5)
    classes = _write(tmp_path / "classes.txt", "\n".join(names).encode())
    full = load_dataset(root, "folder", classes_file=classes)
    small = load_dataset(root, "folder", classes_file=classes, limit=10)
    again = load_dataset(root, "folder", classes_file=classes, limit=10)
    larger = load_dataset(root, "folder", classes_file=classes, limit=30)
    assert small.items == again.items and larger.items[:10] == small.items
    assert small.num_total == full.num_total == 100 and len(small) == 10
    assert len({y for _, y in small.items}) > 5  # not just the first two classes
    shuffled = list(full.items)
    random.Random(0).shuffle(shuffled)
    assert list(small.items) == shuffled[:10]
    assert len(load_dataset(root, "folder", classes_file=classes, limit=1000)) == 100
    for bad in (0, -1, 2.5, "10", True):
        with pytest.raises(DatasetError, match=rf"limit must be a positive integer .*got {bad!r}"):
            load_dataset(root, "folder", classes_file=classes, limit=bad)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset root .*nope' does not exist"):
        load_dataset(tmp_path / "nope", "imagenet")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "imagenet-a")
    msg = str(err.value)
    assert f"expected '{tmp_path / 'imagenet-a'}'" in msg
    assert str(tmp_path / "imagenet-adversarial" / "imagenet-a") in msg
    with pytest.raises(DatasetError, match=r"ImageNet-Sketch/sketch"):
        load_dataset(tmp_path, "imagenet-sketch")
    with pytest.raises(DatasetError, match=r"no FGVCAircraft folder .*fgvc_aircraft"):
        load_dataset(tmp_path, "fgvc-aircraft")


def test_wrong_class_count_names_missing_wnid(tmp_path, image_bytes):
    wnids = ds.imagenet_wnids("imagenet-a")
    _class_folders(tmp_path / "imagenet-a", wnids[:3] + wnids[4:], image_bytes, with_images=(wnids[0],))
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "imagenet-a")
    msg = str(err.value)
    assert "should hold 200 class folders" in msg and "found 199 of them" in msg
    assert f"missing 1: {wnids[3]}" in msg


def test_imagenet_folder_of_the_wrong_kind(tmp_path, image_bytes):
    """An ImageNet folder holding something else: the error says what it holds instead."""
    _class_folders(tmp_path / "imagenet" / "val", ["cat", "dog"], image_bytes, with_images=("cat",))
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "imagenet")
    msg = str(err.value)
    assert "found 0 of them; missing 1000: n01440764" in msg and "(+995 more)" in msg
    assert "2 other folder(s): cat, dog" in msg


def test_v2_missing_numbers(tmp_path, image_bytes):
    folder = tmp_path / "imagenetv2-matched-frequency-format-val"
    numbers = [str(k) for k in range(1000) if k not in (10, 500)]
    _class_folders(folder, numbers, image_bytes, with_images=("0",))
    with pytest.raises(DatasetError, match=r"found 998 of them; missing 2: 10, 500"):
        load_dataset(tmp_path, "imagenet-v2")


def test_no_images_at_all(tmp_path, image_bytes):
    _class_folders(tmp_path / "imagenet-r", ds.imagenet_wnids("imagenet-r"), image_bytes)
    with pytest.raises(DatasetError, match=r"imagenet-r: .* no image files"):
        load_dataset(tmp_path, "imagenet-r")


def test_missing_split(tmp_path, image_bytes):
    os.makedirs(tmp_path / "oxford_pets" / "images")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "oxford-pets")
    msg = str(err.value)
    assert "split file split_zhou_OxfordPets.json not found" in msg
    assert str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json") in msg
    assert str(tmp_path / "data_splits" / "split_zhou_OxfordPets.json") in msg


def test_split_missing_images(tmp_path, image_bytes):
    names = [f"cat{i}" for i in range(100)]
    base, img_root, test = _coop_root(tmp_path, image_bytes, "caltech-101", "101_ObjectCategories",
                                      "Caltech101", names, test_per_class=3)
    os.remove(img_root / "cat1" / "test_0.jpg")
    os.remove(img_root / "cat2" / "test_2.jpg")
    os.mkfifo(img_root / "cat2" / "test_2.jpg")  # not a regular file: missing too
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "caltech101")
    msg = str(err.value)
    assert "2 of the 9 test images are missing" in msg and str(img_root) in msg
    assert "cat2/test_2.jpg" in msg and "cat1/test_0.jpg" in msg


def test_split_content_checked(tmp_path, image_bytes):
    names = [f"action_{i}" for i in range(101)]
    base, _, _ = _coop_root(tmp_path, image_bytes, "ucf101", "UCF-101-midframes", "UCF101", names)
    path = base / "split_zhou_UCF101.json"
    split = json.loads(path.read_text())
    good = json.dumps(split)
    assert load_dataset(tmp_path, "ucf101").classnames[5] == "action 5"

    split["train"] = split["train"][:-1]  # label 100 no longer named anywhere
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetError,
                       match=r"names 100 classes, expected 101; labels without a name: 100"):
        load_dataset(tmp_path, "ucf101")
    split = json.loads(good)
    split["train"][0][2] = "other"
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"names label 0 both 'action_0' and 'other'"):
        load_dataset(tmp_path, "ucf101")
    split = json.loads(good)
    split["test"][0][1] = 101
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"test\[0\] has label 101; UCF101 has 101 classes"):
        load_dataset(tmp_path, "ucf101")
    path.write_text('{"train": []}')
    with pytest.raises(DatasetError, match=r"has no 'test' list"):
        load_dataset(tmp_path, "ucf101")
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"cannot read split file"):
        load_dataset(tmp_path, "ucf101")


def test_many_files_listed_without_opening(tmp_path, monkeypatch):
    """5,000 empty "images" (none could be decoded): listed from directory entries alone, no file
    opened (a large set is listed in a fraction of a second)."""
    import builtins

    import PIL.Image

    root = tmp_path / "big"
    names = [f"c{i:02d}" for i in range(50)]
    for n in names:
        os.makedirs(root / n)
        for k in range(100):
            (root / n / f"{k}.jpg").touch()
    classes = _write(tmp_path / "classes.txt", "\n".join(names).encode())
    real_open = builtins.open

    def no_image_opened(path, *a, **k):
        assert not str(path).endswith(".jpg"), f"listing opened {path}"
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_image_opened)
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("listing decoded an image"))
    s = load_dataset(root, "folder", classes_file=classes)
    assert len(s) == 5000 and s.items[0] == (str(root / "c00" / "0.jpg"), 0)
