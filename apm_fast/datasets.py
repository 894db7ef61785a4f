"""The labelled evaluation sets of ``apm-fast eval``: which images, which labels, which prompts.

The user points the evaluation at ONE root folder holding the datasets, laid out as the TPT harness
(azshue/TPT ``data/datautils.py``, ``data/fewshot_datasets.py``) and the CoOp data guide
(KaiyangZhou/CoOp ``DATASETS.md``, ``datasets/*.py``) have them; ZERO (FarinaMatteo/zero
``data/datautils.py``) and TTA-VLM (TomSheng21/tta-vlm ``data/datautils.py``) follow them
too. The harnesses disagree on a few
folder spellings, so each set has a list of candidate folders, tried in order; the first one that
holds the set wins (the first that merely exists is used to say what is missing). The folders tried
under the root (first = preferred), and the number of classes:

- ``imagenet`` (1000): ``imagenet/val`` (ZERO), ``ImageNet/val`` (TPT), ``imagenet/images/val``
  (CoOp); one folder per wnid.
- ``imagenet-a`` (200): ``imagenet-a`` (TPT, ZERO), ``imagenet-adversarial/imagenet-a`` (CoOp).
- ``imagenet-v2`` (1000): ``imagenetv2-matched-frequency-format-val`` (TPT, ZERO),
  ``imagenetv2/imagenetv2-matched-frequency-format-val`` (CoOp); folders ``0`` … ``999``, the class
  is int(folder name) (TPT lists them with ImageFolder, sorted as strings, and re-maps the names
  with its ``imagenet_v_mask``; reading the number directly gives the same labels).
- ``imagenet-r`` (200): ``imagenet-r`` (TPT, ZERO), ``imagenet-rendition/imagenet-r`` (CoOp).
- ``imagenet-sketch`` (1000): ``imagenet-sketch`` (ZERO), ``imagenet-sketch/sketch``,
  ``imagenet-sketch/images`` (CoOp), ``ImageNet-Sketch/sketch``, ``ImageNet-Sketch`` (TPT).
- ``imagenet-c`` (1000): ``imagenet-c/<corruption>/<severity>``, ``ImageNet-C/<corruption>/<severity>``
  (the hendrycks/robustness layout), then wnid folders; 15 corruptions, severities 1..5.
- ``flowers102`` (102): ``oxford_flowers`` (CoOp), ``Flower102`` (TPT), ``flower102`` (ZERO); images
  under ``jpg``; ``split_zhou_OxfordFlowers.json``.
- ``dtd`` (47): ``dtd`` (CoOp, ZERO), ``DTD`` (TPT); ``images``; ``split_zhou_DescribableTextures.json``.
- ``oxford-pets`` (37): ``oxford_pets`` (CoOp, ZERO), ``OxfordPets`` (TPT); ``images``;
  ``split_zhou_OxfordPets.json``.
- ``stanford-cars`` (196): ``stanford_cars`` (CoOp, ZERO), ``StanfordCars`` (TPT); the image root is
  the folder itself (the split's paths start with ``cars_test/``); ``split_zhou_StanfordCars.json``.
- ``ucf101`` (101): ``ucf101`` (CoOp, ZERO), ``UCF101`` (TPT); ``UCF-101-midframes``;
  ``split_zhou_UCF101.json``.
- ``caltech101`` (100): ``caltech-101`` (CoOp, ZERO), ``Caltech101`` (TPT); ``101_ObjectCategories``;
  ``split_zhou_Caltech101.json``.
- ``food101`` (101): ``food-101`` (CoOp), ``Food101`` (TPT), ``food101`` (ZERO); ``images``;
  ``split_zhou_Food101.json``.
- ``sun397`` (397): ``sun397`` (CoOp, ZERO), ``SUN397`` (TPT); ``SUN397``; ``split_zhou_SUN397.json``.
- ``fgvc-aircraft`` (100): ``fgvc_aircraft`` (CoOp, TPT, ZERO), ``fgvc-aircraft-2013b/data`` (the
  released archive unpacked); no split json, as in CoOp ``datasets/fgvc_aircraft.py``:
  ``variants.txt`` gives the class names in label order, ``images_variant_test.txt`` the test
  list (``<image id> <variant>`` lines), the images are ``images/<image id>.jpg``.
- ``eurosat`` (10): ``eurosat`` (CoOp, ZERO), ``EuroSAT``; ``2750``; ``split_zhou_EuroSAT.json``.
- ``folder`` (n): the root itself is an ImageFolder (one sub-folder per class, sorted by name) and
  ``classes_file`` names the classes in label order, one a line.

Each fine-grained set is also looked for under ``few-shot-datasets/<CoOp folder>`` (TTA-VLM's
layout), after the folders above.
Where a CoOp set keeps its images elsewhere in another harness (ZERO: ``images``; TPT: the folder
itself), those image roots are tried after CoOp's, and the first one holding the split's first test
image is used. The split json is looked for in the dataset folder (CoOp, ZERO) and then in
``<root>/data_splits/`` (TPT keeps the json files in its own ``data/data_splits``).

The CoOp sets use the ``test`` list of the split json (``{"train"|"val"|"test": [[relative image
path, label, classname], ...]}``, written by CoOp ``OxfordPets.save_split``), in the split's order.

Labels are always indices into ``EvalSet.classnames``, never names: the CLIP ImageNet names repeat
two names ("missile", "sunglasses"), so a name cannot identify a class.

Nothing here opens an image: everything is computed from directory listings (``os.scandir``), so a
50,000-image folder is listed in well under a second on a local disk.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

from .teachers.prompts import imagenet_classnames  # the one ImageNet list

__all__ = [
    "DATASETS", "DatasetSpec", "EvalSet", "DatasetError", "load_dataset", "IMAGE_EXTENSIONS",
    "IMAGENET_C_CORRUPTIONS", "IMAGENET_C_SEVERITIES", "imagenet_wnids", "imagenet_classnames",
    "imagenet_subset_indices", "dataset_templates",
]

# Compared lower-cased, so "x.JPEG" (the ImageNet spelling) counts as ".jpeg". The list is
# torchvision's IMG_EXTENSIONS, which the TPT harness' ImageFolder uses.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# The 15 ImageNet-C benchmark corruptions (hendrycks/robustness ImageNet-C/test.py lists them first;
# its 4 extra "validation" corruptions are not part of the benchmark) and their severities.
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
IMAGENET_C_SEVERITIES = (1, 2, 3, 4, 5)

_SHOW = 5  # how many missing names an error message lists


class DatasetError(ValueError):
    """The root (or an argument) does not give what the requested dataset needs; says what is missing."""


@dataclass(frozen=True)
class DatasetSpec:
    """How a dataset is laid out under the root.

    kind: ``"wnid"`` (one folder per ImageNet wnid, ``wnids`` says which list), ``"numeric"``
    (ImageNet-V2: folders ``0`` … ``999``), ``"wnid-c"`` (ImageNet-C: ``<corruption>/<severity>/``
    then wnid folders), ``"split"`` (CoOp split json), ``"aircraft"`` (CoOp's FGVC-Aircraft text
    files), ``"folder"`` (a user ImageFolder plus a classes file).
    folders: candidate dataset folders relative to the root, preferred first.
    image_dirs: (split/aircraft) candidate image roots relative to the dataset folder ("" = itself).
    """

    id: str
    kind: str
    name: str
    num_classes: int | None
    folders: tuple[str, ...] = ()
    wnids: str | None = None
    image_dirs: tuple[str, ...] = ()
    split_file: str | None = None
    templates: str = "imagenet"  # key into data/templates.json


def _coop(id_, name, n, folders, image_dirs, split_name, templates=None):
    folders = folders + (f"few-shot-datasets/{folders[0]}",)  # TTA-VLM nests CoOp's folders
    return DatasetSpec(id=id_, kind="split", name=name, num_classes=n, folders=folders,
                       image_dirs=image_dirs, split_file=f"split_zhou_{split_name}.json",
                       templates=templates or id_)


DATASETS: dict[str, DatasetSpec] = {spec.id: spec for spec in (
    DatasetSpec("imagenet", "wnid", "ImageNet (val)", 1000,
                ("imagenet/val", "ImageNet/val", "imagenet/images/val"), wnids="imagenet"),
    DatasetSpec("imagenet-a", "wnid", "ImageNet-A", 200,
                ("imagenet-a", "imagenet-adversarial/imagenet-a"), wnids="imagenet-a"),
    DatasetSpec("imagenet-v2", "numeric", "ImageNet-V2 (matched frequency)", 1000,
                ("imagenetv2-matched-frequency-format-val",
                 "imagenetv2/imagenetv2-matched-frequency-format-val")),
    DatasetSpec("imagenet-r", "wnid", "ImageNet-R", 200,
                ("imagenet-r", "imagenet-rendition/imagenet-r"), wnids="imagenet-r"),
    DatasetSpec("imagenet-sketch", "wnid", "ImageNet-Sketch", 1000,
                ("imagenet-sketch", "imagenet-sketch/sketch", "imagenet-sketch/images",
                 "ImageNet-Sketch/sketch", "ImageNet-Sketch"), wnids="imagenet"),
    DatasetSpec("imagenet-c", "wnid-c", "ImageNet-C", 1000, ("imagenet-c", "ImageNet-C"),
                wnids="imagenet"),
    _coop("flowers102", "Flowers102", 102, ("oxford_flowers", "Flower102", "flower102"),
          ("jpg",), "OxfordFlowers"),
    _coop("dtd", "DTD", 47, ("dtd", "DTD"), ("images",), "DescribableTextures"),
    _coop("oxford-pets", "OxfordPets", 37, ("oxford_pets", "OxfordPets"), ("images", ""),
          "OxfordPets"),
    _coop("stanford-cars", "StanfordCars", 196, ("stanford_cars", "StanfordCars"), ("", "images"),
          "StanfordCars"),
    _coop("ucf101", "UCF101", 101, ("ucf101", "UCF101"), ("UCF-101-midframes", "images", ""),
          "UCF101"),
    _coop("caltech101", "Caltech101", 100, ("caltech-101", "Caltech101"),
          ("101_ObjectCategories", "images", ""), "Caltech101"),
    _coop("food101", "Food101", 101, ("food-101", "Food101", "food101"), ("images", ""), "Food101"),
    _coop("sun397", "SUN397", 397, ("sun397", "SUN397"), ("SUN397", "images", ""), "SUN397"),
    DatasetSpec("fgvc-aircraft", "aircraft", "FGVCAircraft", 100,
                ("fgvc_aircraft", "fgvc-aircraft-2013b/data", "few-shot-datasets/fgvc_aircraft"),
                image_dirs=("images",),
                templates="fgvc-aircraft"),
    _coop("eurosat", "EuroSAT", 10, ("eurosat", "EuroSAT"), ("2750", "images", ""), "EuroSAT"),
    DatasetSpec("folder", "folder", "ImageFolder", None),
)}


@dataclass(frozen=True)
class EvalSet:
    """One labelled evaluation set, as paths (no image is opened).

    id: e.g. ``"imagenet"``, ``"imagenet-c/gaussian_noise/5"``.
    classnames: the class names in label order (names may repeat; labels are indices).
    templates: prompt templates, ``{c}`` where the class name goes (``t.format(c=name)``).
    items: ``(image path, label)`` pairs: sorted by path for folder layouts, the split's order for
        the CoOp sets; with ``limit`` the first N of a seeded shuffle (see ``load_dataset``).
    root: the dataset folder that was used (absolute), e.g. ``<root>/imagenet/val``.
    num_total: how many items the set has before ``limit``.
    """

    id: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    items: tuple[tuple[str, int], ...]
    root: str
    num_total: int

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------------------------------------
# package data
# ---------------------------------------------------------------------------------------------

_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _data_text(name: str) -> str:
    """A package data file (apm_fast/data/, shipped through setup.py's package_data). Read next to
    this module rather than through importlib.resources: the package has compiled extensions, so it
    is never imported from a zip, and a plain path works however the package was imported."""
    with open(os.path.join(_DATA_DIR, name), encoding="utf-8") as f:
        return f.read()


_WNID_FILES = {"imagenet": "imagenet_wnids.txt", "imagenet-a": "imagenet_a_wnids.txt",
               "imagenet-r": "imagenet_r_wnids.txt"}


@lru_cache(maxsize=None)
def imagenet_wnids(subset: str = "imagenet") -> tuple[str, ...]:
    """The wnids of ``subset`` ("imagenet": all 1000 in the standard sorted order, which is also
    the label order; "imagenet-a"/"imagenet-r": their 200 classes, in that same order)."""
    if subset not in _WNID_FILES:
        raise DatasetError(f"subset must be one of {sorted(_WNID_FILES)}, got {subset!r}")
    return tuple(line.strip() for line in _data_text(_WNID_FILES[subset]).splitlines() if line.strip())


@lru_cache(maxsize=None)
def imagenet_subset_indices(subset: str) -> tuple[int, ...]:
    """Indices into the 1000 ImageNet classes of the classes of ``subset`` (label i of the subset is
    class ``imagenet_subset_indices(subset)[i]`` of ImageNet): the mask that restricts 1000-way
    logits to ImageNet-A/R."""
    position = {w: i for i, w in enumerate(imagenet_wnids("imagenet"))}
    return tuple(position[w] for w in imagenet_wnids(subset))


@lru_cache(maxsize=None)



@lru_cache(maxsize=None)
def _templates_json() -> dict:
    return json.loads(_data_text("templates.json"))


def dataset_templates(dataset_id: str, style: str = "clip") -> tuple[str, ...]:
    """The prompt templates of a dataset, ``{c}`` where the class name goes.

    style "clip": the prompt ensembles of the CLIP paper (openai/CLIP: the 80 ImageNet templates of
    ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``, ``data/prompts.md`` for the others; the
    ImageNet variants and ``folder`` use the ImageNet ones). style "coop": the single template of
    CoOp's ``CUSTOM_TEMPLATES`` (``trainers/zsclip.py``), which TPT-style single-prompt baselines use.
    """
    spec = _spec(dataset_id)
    if style not in ("clip", "coop"):
        raise DatasetError(f"style must be 'clip' or 'coop', got {style!r}")
    entry = _templates_json()[spec.templates][style]
    return (entry,) if isinstance(entry, str) else tuple(entry)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def load_dataset(root, dataset_id: str, *, corruption: str | None = None,
                 severity: int | None = None, classes_file=None, limit: int | None = None) -> EvalSet:
    """List the labelled test images of ``dataset_id`` under ``root`` (see the module docstring).

    root: the folder holding the datasets (for ``folder``: the ImageFolder itself).

    corruption/severity: only for ``imagenet-c`` (both required there).
    classes_file: only for ``folder`` (required there): the class names in label order, one a line,
        one line per class folder (trailing blank lines are ignored, names must be unique).
    limit: keep only N items: the items are shuffled with ``random.Random(0)`` and the first N are
        kept, so a short run sees many classes rather than the first few (unshuffled, the items
        come grouped by class), the same N on every run, and a smaller limit is a prefix of a
        larger one. ``num_total`` still counts all items.

    Raises DatasetError (a ValueError) naming what is missing or which argument is wrong.
    """
    spec = _spec(dataset_id)
    if spec.kind != "wnid-c" and (corruption is not None or severity is not None):
        arg = "corruption" if corruption is not None else "severity"
        raise DatasetError(f"{arg} (--{arg}) applies only to imagenet-c, not to {dataset_id!r}")
    if spec.kind != "folder" and classes_file is not None:
        raise DatasetError(f"classes_file (--classes) applies only to 'folder', not to {dataset_id!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer (or None for all items), got {limit!r}")
    root_s = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root_s):
        what = "does not exist" if not os.path.exists(root_s) else "is not a folder"
        raise DatasetError(f"dataset root {root_s!r} {what}")

    loader = _LOADERS[spec.kind]
    set_id, folder, classnames, items = loader(spec, root_s, corruption=corruption,
                                               severity=severity, classes_file=classes_file)
    if not items:
        raise DatasetError(f"{set_id}: {folder!r} holds the expected class folders but no image "
                           f"files (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)")
    total = len(items)
    if limit is not None:
        items = list(items)
        random.Random(0).shuffle(items)
        items = items[:limit]
    return EvalSet(id=set_id, classnames=tuple(classnames), templates=dataset_templates(spec.id),
                   items=tuple(items), root=folder, num_total=total)


def _spec(dataset_id: str) -> DatasetSpec:
    try:
        return DATASETS[dataset_id]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown dataset {dataset_id!r}; known: {', '.join(DATASETS)}") from None


def _listing(names: Sequence[str], n: int = _SHOW) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _resolve_folder(spec: DatasetSpec, root: str, holds_set: Callable[[str], bool],
                    what: str) -> str:
    """The first candidate folder that holds the set; else the first that exists (the caller's
    checks then say what it lacks); else a DatasetError naming every candidate."""
    tried = [os.path.join(root, rel) for rel in spec.folders]
    existing = [p for p in tried if os.path.isdir(p)]
    for path in existing:
        if holds_set(path):
            return path
    if existing:
        return existing[0]
    also = f" (also tried: {', '.join(repr(p) for p in tried[1:])})" if len(tried) > 1 else ""
    raise DatasetError(f"{spec.id}: no {spec.name} folder under the root: expected {tried[0]!r}"
                       f"{also}, holding {what}")


def _subdirs(path: str) -> list[str]:
    """Names of the non-hidden sub-folders of ``path`` (symlinks to folders count)."""
    out = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    out.append(entry.name)
            except OSError:
                continue
    return out


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_images(class_dir: str) -> list[str]:
    """Image files under ``class_dir``, recursively (as torchvision's ImageFolder, which the TPT
    harness uses, finds them): image extension, regular file (``is_file`` follows symlinks, so a
    broken symlink or a FIFO is skipped), hidden names skipped. A folder reached twice through
    symlinks is listed once."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [class_dir]
    while stack:
        path = stack.pop()
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_dir():
                        if not entry.name.startswith("."):
                            stack.append(entry.path)
                    elif _is_image_name(entry.name) and entry.is_file():
                        out.append(entry.path)
                except OSError:
                    continue
    return out


def _class_folder_items(folder: str, class_dirs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    items = []
    for name, label in class_dirs:
        items.extend((path, label) for path in _scan_images(os.path.join(folder, name)))
    items.sort()
    return items


def _check_class_folders(set_id: str, folder: str, expected: Sequence[str], what: str) -> None:
    """Every expected class folder present, or a DatasetError: expected vs found, first missing."""
    present = set(_subdirs(folder))
    missing = [name for name in expected if name not in present]
    if not missing:
        return
    found = len(expected) - len(missing)
    others = sorted(present.difference(expected))
    hint = f"; it holds {len(others)} other folder(s): {_listing(others)}" if others else ""
    raise DatasetError(
        f"{set_id}: {folder!r} should hold {len(expected)} class folders ({what}); found "
        f"{found} of them; missing {len(missing)}: {_listing(missing)}{hint}")


def _load_wnid(spec, root, **_):
    wnids = imagenet_wnids(spec.wnids)
    folder = _resolve_folder(spec, root, lambda p: _holds_any(p, wnids),
                             f"{len(wnids)} ImageNet wnid folders (e.g. {wnids[0]})")
    return _wnid_set(spec.id, spec, folder, wnids)


def _holds_any(path: str, names: Sequence[str]) -> bool:
    return any(os.path.isdir(os.path.join(path, n)) for n in names[:50]) or \
        bool(set(_subdirs(path)).intersection(names))


def _wnid_set(set_id, spec, folder, wnids):
    _check_class_folders(set_id, folder, wnids, f"ImageNet wnids, e.g. {wnids[0]}")
    names = imagenet_classnames()
    if spec.wnids == "imagenet":
        classnames = names
    else:
        classnames = tuple(names[i] for i in imagenet_subset_indices(spec.wnids))
    items = _class_folder_items(folder, ((w, label) for label, w in enumerate(wnids)))
    return set_id, folder, classnames, items


def _load_numeric(spec, root, **_):
    """ImageNet-V2: folder ``k`` holds class k (not the k-th folder in sorted-string order, where
    "10" would come before "2")."""
    expected = [str(k) for k in range(spec.num_classes)]
    folder = _resolve_folder(spec, root, lambda p: os.path.isdir(os.path.join(p, "0")),
                             f"folders 0 … {spec.num_classes - 1}")
    _check_class_folders(spec.id, folder, expected, "named 0 … 999 by ImageNet class index")
    items = _class_folder_items(folder, ((name, int(name)) for name in expected))
    return spec.id, folder, imagenet_classnames(), items


def _load_imagenet_c(spec, root, *, corruption, severity, **_):
    if corruption is None:
        raise DatasetError(f"imagenet-c needs corruption (--corruption), one of: "
                           f"{', '.join(IMAGENET_C_CORRUPTIONS)}")
    if corruption not in IMAGENET_C_CORRUPTIONS:
        raise DatasetError(f"unknown corruption (--corruption) {corruption!r}; the 15 ImageNet-C "
                           f"corruptions are: {', '.join(IMAGENET_C_CORRUPTIONS)}")
    if severity is None:
        raise DatasetError("imagenet-c needs severity (--severity), an integer 1..5")
    if isinstance(severity, bool) or not isinstance(severity, int) or \
            severity not in IMAGENET_C_SEVERITIES:
        raise DatasetError(f"severity (--severity) must be an integer 1..5, got {severity!r}")
    folder = _resolve_folder(spec, root, lambda p: os.path.isdir(os.path.join(p, corruption)),
                             "<corruption>/<severity>/<wnid> folders")
    corr_dir = os.path.join(folder, corruption)
    if not os.path.isdir(corr_dir):
        present = sorted(c for c in _subdirs(folder) if c in IMAGENET_C_CORRUPTIONS)
        raise DatasetError(f"imagenet-c: no folder {corr_dir!r} for corruption {corruption!r}; "
                           f"present corruptions: {', '.join(present) or 'none'}")
    sev_dir = os.path.join(corr_dir, str(severity))
    if not os.path.isdir(sev_dir):
        raise DatasetError(f"imagenet-c: no folder {sev_dir!r} for severity {severity}; present "
                           f"severities: {', '.join(sorted(_subdirs(corr_dir))) or 'none'}")
    return _wnid_set(f"imagenet-c/{corruption}/{severity}", spec, sev_dir, imagenet_wnids("imagenet"))


def _clean_name(name: str) -> str:
    """Class names as CoOp and TPT put them into prompts: underscores as spaces
    (CoOp trainers/zsclip.py and coop.py, TPT clip/custom_clip.py)."""
    return name.replace("_", " ")


def _check_files(set_id: str, image_root: str, relpaths: Sequence[str], tried: Sequence[str]) -> None:
    """Every listed image a regular file, or a DatasetError with the count and the first few.
    One directory listing per parent folder instead of one stat per image (fast on network disks)."""
    by_dir: dict[str, list[str]] = {}
    for rel in relpaths:
        by_dir.setdefault(os.path.dirname(os.path.join(image_root, rel)), []).append(rel)
    missing = []
    for parent, rels in by_dir.items():
        files = set()
        try:
            with os.scandir(parent) as it:
                for entry in it:
                    try:
                        if entry.is_file():
                            files.add(entry.name)
                    except OSError:
                        continue
        except OSError:
            pass
        missing.extend(r for r in rels if os.path.basename(r) not in files)
    if missing:
        alts = [t for t in tried if t != image_root]
        also = f" (image roots also tried: {', '.join(repr(t) for t in alts)})" if alts else ""
        raise DatasetError(f"{set_id}: {len(missing)} of the {len(relpaths)} test images are "
                           f"missing under {image_root!r}{also}: {_listing(missing)}")


def _pick_image_root(dataset_dir: str, spec: DatasetSpec,
                     first_rel: str | None) -> tuple[str, list[str]]:
    """The first candidate image root holding the first test image; else the first that exists."""
    tried = [os.path.join(dataset_dir, d) if d else dataset_dir for d in spec.image_dirs]
    existing = [t for t in tried if os.path.isdir(t)]
    if first_rel is not None:
        for cand in existing:
            if os.path.isfile(os.path.join(cand, first_rel)):
                return cand, tried
    return (existing[0] if existing else tried[0]), tried


def _load_split(spec, root, **_):
    def holds(p):
        return os.path.isfile(os.path.join(p, spec.split_file)) or \
            any(d and os.path.isdir(os.path.join(p, d)) for d in spec.image_dirs)

    folder = _resolve_folder(spec, root, holds, f"{spec.split_file} and the images")
    split_tried = [os.path.join(folder, spec.split_file),
                   os.path.join(root, "data_splits", spec.split_file)]
    split_path = next((p for p in split_tried if os.path.isfile(p)), None)
    if split_path is None:
        raise DatasetError(f"{spec.id}: split file {spec.split_file} not found: expected "
                           f"{split_tried[0]!r} (also tried {split_tried[1]!r}); it is CoOp's fixed "
                           "split, linked from KaiyangZhou/CoOp DATASETS.md")
    try:
        with open(split_path, encoding="utf-8") as f:
            split = json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{spec.id}: cannot read split file {split_path!r}: {exc}") from None
    if not isinstance(split, dict) or not isinstance(split.get("test"), list):
        raise DatasetError(f"{spec.id}: split file {split_path!r} has no 'test' list "
                           "(expected {'train': [...], 'val': [...], 'test': [...]})")

    names: dict[int, str] = {}
    test: list[tuple[str, int]] = []
    for part in ("test", "train", "val"):  # the test split first: its names are the ones evaluated
        entries = split.get(part) or []
        for i, entry in enumerate(entries):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool)
                    and isinstance(entry[2], str)):
                raise DatasetError(f"{spec.id}: {split_path!r} {part}[{i}] is {entry!r}, expected "
                                   "[relative image path, integer label, class name]")
            rel, label, cname = entry
            if not 0 <= label < spec.num_classes:
                raise DatasetError(f"{spec.id}: {split_path!r} {part}[{i}] has label {label}; "
                                   f"{spec.name} has {spec.num_classes} classes (0 … "
                                   f"{spec.num_classes - 1})")
            if names.setdefault(label, cname) != cname:
                raise DatasetError(f"{spec.id}: {split_path!r} names label {label} both "
                                   f"{names[label]!r} and {cname!r} ({part}[{i}])")
            if part == "test":
                test.append((rel, label))
    if len(names) != spec.num_classes:
        unnamed = [str(k) for k in range(spec.num_classes) if k not in names]
        raise DatasetError(f"{spec.id}: {split_path!r} names {len(names)} classes, expected "
                           f"{spec.num_classes}; labels without a name: {_listing(unnamed)}")
    if not test:
        raise DatasetError(f"{spec.id}: the 'test' list of {split_path!r} is empty")
    classnames = [_clean_name(names[k]) for k in range(spec.num_classes)]
    image_root, tried = _pick_image_root(folder, spec, test[0][0] if test else None)
    _check_files(spec.id, image_root, [rel for rel, _ in test], tried)
    items = [(os.path.join(image_root, rel), label) for rel, label in test]
    return spec.id, folder, classnames, items


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _load_aircraft(spec, root, **_):
    """CoOp datasets/fgvc_aircraft.py: class names are the lines of variants.txt (label = line
    index); the test list is images_variant_test.txt, ``<image id> <variant name>`` per line (the
    name may hold spaces), image ``images/<image id>.jpg``."""
    folder = _resolve_folder(spec, root, lambda p: os.path.isfile(os.path.join(p, "variants.txt")),
                             "variants.txt, images_variant_test.txt and images/")
    need = [os.path.join(folder, n) for n in ("variants.txt", "images_variant_test.txt")]
    absent = [p for p in need if not os.path.isfile(p)]
    if absent:
        raise DatasetError(f"{spec.id}: missing {', '.join(repr(p) for p in absent)} (the FGVC-Aircraft "
                           "archive's data/ folder holds them)")
    variants = _read_lines(need[0])
    if len(variants) != spec.num_classes or len(set(variants)) != len(variants) or "" in variants:
        raise DatasetError(f"{spec.id}: {need[0]!r} should list {spec.num_classes} distinct variant "
                           f"names, one a line; it has {len(variants)} lines, "
                           f"{len(set(variants) - {''})} distinct names")
    label_of = {name: i for i, name in enumerate(variants)}
    test = []
    for lineno, line in enumerate(_read_lines(need[1]), start=1):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise DatasetError(f"{spec.id}: {need[1]!r} line {lineno} ({line!r}): variant "
                               f"{variant!r} is not in variants.txt")
        test.append((f"{image_id}.jpg", label_of[variant]))
    if not test:
        raise DatasetError(f"{spec.id}: {need[1]!r} lists no test images")
    image_root, tried = _pick_image_root(folder, spec, test[0][0] if test else None)
    _check_files(spec.id, image_root, [rel for rel, _ in test], tried)
    items = [(os.path.join(image_root, rel), label) for rel, label in test]
    return spec.id, folder, [_clean_name(v) for v in variants], items


def _load_folder(spec, root, *, classes_file, **_):
    """A user ImageFolder: every non-hidden sub-folder of the root is a class, in sorted order (as
    torchvision's ImageFolder numbers them); classes_file gives their names in that order."""
    if classes_file is None:
        raise DatasetError("dataset 'folder' needs classes_file (--classes FILE): the class names "
                           "in label order (sorted class-folder order), one a line")
    path = os.path.abspath(os.path.expanduser(os.fspath(classes_file)))
    if not os.path.isfile(path):
        raise DatasetError(f"classes_file (--classes) {path!r} does not exist or is not a file")
    names = _read_lines(path)
    blank = [str(i) for i, n in enumerate(names, start=1) if not n]
    if blank:
        raise DatasetError(f"classes_file (--classes) {path!r} has blank lines (line "
                           f"{_listing(blank)}); one class name a line, no gaps")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names, start=1):
        if n in seen:
            dups.append(f"{n!r} (lines {seen[n]} and {i})")
        seen.setdefault(n, i)
    if dups:
        raise DatasetError(f"classes_file (--classes) {path!r} repeats class names: {_listing(dups)}")
    class_dirs = sorted(_subdirs(root))
    if not class_dirs:
        raise DatasetError(f"folder: {root!r} has no class sub-folders (one folder per class expected)")
    if len(names) != len(class_dirs):
        raise DatasetError(f"classes_file (--classes) {path!r} has {len(names)} names but {root!r} "
                           f"has {len(class_dirs)} class folders ({_listing(class_dirs)}); one name "
                           "per class folder, in sorted folder order")
    items = _class_folder_items(root, ((d, label) for label, d in enumerate(class_dirs)))
    return "folder", root, names, items


_LOADERS = {"wnid": _load_wnid, "numeric": _load_numeric, "wnid-c": _load_imagenet_c,
            "split": _load_split, "aircraft": _load_aircraft, "folder": _load_folder}
