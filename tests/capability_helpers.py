"""Tiny teachers, students and photo folders for the capability tests (distill, islands, decode,
interpolate): everything offline, random weights, a few seconds on a CPU."""
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apm_fast import preset

TINY_DINO = {"architecture": "vit_small_patch14_dinov2", "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def tiny_dino(grid=4, seed=0):
    """A one-block DINOv2 (D = 16) with random weights, seeded."""
    from apm_fast.teachers import RandomWeightsWarning
    from apm_fast.teachers.dinov2 import DINOv2Teacher

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return DINOv2Teacher(TINY_DINO["architecture"], None, grid=grid, device="cpu",
                             model_kwargs=TINY_DINO["kwargs"])


def write_dino_json(folder) -> Path:
    path = Path(folder) / "tiny_dino.json"
    path.write_text(json.dumps(TINY_DINO))
    return path


def ssl_config(grid=4, patch=4, hidden=(48, 48, 32), dim=16):
    return preset("ssl-l14", grid=grid, patch=patch, hidden=hidden, dim=dim)


def photo(name, size=(64, 48)) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a[..., :3]).resize(size, Image.BICUBIC)


def photo_folder(folder, names=PHOTOS, size=(64, 48)) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        photo(n, size).save(folder / f"{n}.png")
    return folder


def quiet_log(_):
    pass
