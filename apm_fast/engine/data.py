"""Images for the pipeline: decoded and resized in DataLoader workers, normalized on the device.

Each item gives the teacher's view (its own ``preprocess``: e.g. 224 px, CLIP normalization) and
the student's view: the image resized (shorter side) and center-cropped to G*p pixels, shipped as
uint8 (4x less to pin and copy than fp32) and normalized with ImageNet mean/std on the device,
as the authors' TTT path does.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_rgb", "student_pixels", "normalize_student",
           "TTTImages", "make_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(src):
    """A PIL RGB image from a path, a PIL image, an H x W (x 3) array (``apm_fast.images.to_pil``:
    EXIF rotation, any mode) or a 3 x H x W uint8 tensor."""
    from PIL import Image

    from ..images import to_pil

    if isinstance(src, torch.Tensor):
        if src.dtype == torch.uint8 and src.dim() == 3 and src.shape[0] in (1, 3):
            return Image.fromarray(src.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())
        raise TypeError(f"images: a tensor must be 3 x H x W uint8 pixels, got dtype {src.dtype} and "
                        f"shape {tuple(src.shape)}")
    return to_pil(src, name="images")


def student_pixels(img, size: int) -> torch.Tensor:
    """3 x size x size uint8: shorter side resized to ``size`` (bicubic), center crop."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


_STATS: dict = {}


def normalize_student(pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x S x S uint8 -> float32 normalized with ImageNet mean/std (on the pixels' device)."""
    key = str(pixels.device)
    if key not in _STATS:           # once per device: no small host copy in every batch
        _STATS[key] = (torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255.0,
                       torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255.0)
    mean, std = _STATS[key]
    return (pixels.float() - mean) / std


class TTTImages(torch.utils.data.Dataset):
    """(index, teacher view, student uint8 view, None) for every source, or (index, None, None,
    reason) for one that cannot be read: a bad file must not stop the other images."""

    def __init__(self, sources: Sequence, teacher_preprocess: Callable, size: int):
        self.sources = list(sources)
        self.teacher_preprocess = teacher_preprocess
        self.size = int(size)

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            img = load_rgb(self.sources[i])
        except (OSError, ValueError, TypeError) as exc:     # ImageLoadError is a ValueError
            return i, None, None, str(exc)
        return i, self.teacher_preprocess(img), student_pixels(img, self.size), None


def _collate(items):
    """(indices of the readable images, their teacher batch, their student batch, [(index, reason)]);
    the batches are None when nothing in this batch could be read."""
    good = [it for it in items if it[3] is None]
    failed = [(it[0], it[3]) for it in items if it[3] is not None]
    idx = torch.tensor([it[0] for it in good], dtype=torch.long)
    if not good:
        return idx, None, None, failed
    return idx, torch.stack([it[1] for it in good]), torch.stack([it[2] for it in good]), failed


def make_loader(sources, teacher_preprocess, size: int, batch_size: int, *, num_workers: int | None = None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches of ``batch_size`` (the number of students) in order; workers decode and resize."""
    if num_workers is None:
        num_workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    return torch.utils.data.DataLoader(
        TTTImages(sources, teacher_preprocess, size), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=_collate,
        prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)
