"""The one image pipeline: files -> PIL images -> the student's input; the Dataset and loader.

Decision on sizes: the model refuses images of the wrong size (:func:`apm_fast.validation.check_images`),
because silently resizing changes what the trigger convolution sees; :func:`preprocess` is the
place that resizes (shorter side to S = grid * patch, then a centre crop) and normalizes with the
ImageNet mean/std (the authors' TTT input). Channels: every loader here returns RGB (grayscale,
palette, RGBA, CMYK and 16-bit files are converted, the alpha channel dropped, the same conversion
as the CLIP teachers' own preprocessing), while a *tensor* with the wrong channel count is refused
by the model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageLoadError", "load_image",
           "to_pil", "pixels", "normalize", "preprocess", "preprocess_batch", "find_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Files picked up when a directory is given (explicitly named files are always tried).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm", ".pnm"})

PathLike = Union[str, os.PathLike]


class ImageLoadError(ValueError):
    """A file that cannot be read as an image (missing, not an image, truncated, ...)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image file {self.path!r}: {reason}")


def _rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit gray: PIL's own conversion clips at 255, so scale to the value range first
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and a.max(initial=0) <= 1.0 else (
            255.0 if a.max(initial=0) <= 255 else 65535.0 if a.max(initial=0) <= 65535 else a.max())
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def load_image(path: PathLike) -> Image.Image:
    """Read an image file as an RGB PIL image (EXIF rotation applied); :class:`ImageLoadError`
    naming the file when it is missing, a directory, or not a readable image."""
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(path, "no such file")
    if p.is_dir():
        raise ImageLoadError(path, "is a directory, expected an image file")
    try:
        with Image.open(p) as img:
            img.load()  # decode now: truncated or corrupt data fails here, not later
            img = ImageOps.exif_transpose(img)
            return _rgb(img)
    except Image.UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (PIL cannot identify the file format)") from None
    except Exception as exc:  # truncated data, decoder errors, decompression bombs, permissions
        raise ImageLoadError(path, f"cannot be read as an image ({type(exc).__name__}: {exc})") from exc


def to_pil(image, name: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, an H x W (x 1|3|4) numpy array (uint8, or
    floats in [0, 1]) or a 1|3 x H x W uint8 tensor (pixels)."""
    if isinstance(image, Image.Image):
        return _rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] in (1, 3):
            return Image.fromarray(image.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())
        raise TypeError(f"{name}: a tensor must be 3 x H x W uint8 pixels, got dtype {image.dtype} and "
                        f"shape {tuple(image.shape)}")
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ValueError(f"{name}: expected an H x W or H x W x 3/4 array, got shape {a.shape}")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"{name}: expected a uint8 array or floats in [0, 1], got dtype {a.dtype}")
            if not np.isfinite(a).all():
                raise ValueError(f"{name}: expected finite pixel values, found NaN/Inf")
            a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return _rgb(Image.fromarray(a))
    raise TypeError(f"{name}: expected a PIL image, a file path, a numpy array or uint8 pixels, "
                    f"got {type(image).__name__}")


def _size_of(size_or_config) -> int:
    size = getattr(size_or_config, "image_size", size_or_config)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size: expected a positive int or an APMConfig, got {size_or_config!r}")
    return size


def pixels(image, size_or_config, *, crop: str | None = "center") -> torch.Tensor:
    """3 x S x S uint8 pixels of one image (RGB). ``size_or_config``: S, or an
    :class:`~apm_fast.APMConfig` (S = grid * patch). ``crop="center"``: scale the shorter side to
    S (bicubic) and cut the centre square (keeps the aspect ratio, like the teachers'
    preprocessing); ``crop=None``: stretch the whole image to S x S (the authors' TTT input)."""
    s = _size_of(size_or_config)
    img = to_pil(image)
    if crop == "center":
        w, h = img.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
    elif crop is None:
        img = img.resize((s, s), Image.BICUBIC)
    else:
        raise ValueError(f"crop: expected 'center' or None, got {crop!r}")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


_STATS: dict = {}


def normalize(px: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(B x) 3 x S x S uint8 pixels -> float32 normalized with ``mean``/``std`` (ImageNet's by
    default), on the pixels' device (the statistics are put there once per device)."""
    key = (str(px.device), tuple(mean), tuple(std))
    if key not in _STATS:           # once per device: no small host copy in every batch
        _STATS[key] = (torch.tensor(mean, device=px.device).view(3, 1, 1) * 255.0,
                       torch.tensor(std, device=px.device).view(3, 1, 1) * 255.0)
    m, sd = _STATS[key]
    return (px.float() - m) / sd


def preprocess(image, size_or_config, *, crop: str | None = "center",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """The student's input for one image: RGB, resized to S x S (:func:`pixels`), normalized ->
    3 x S x S float32."""
    return normalize(pixels(image, size_or_config, crop=crop), mean, std).contiguous()


def preprocess_batch(images: Iterable, size_or_config, **kw) -> torch.Tensor:
    """:func:`preprocess` for several images -> B x 3 x S x S."""
    xs = [preprocess(im, size_or_config, **kw) for im in images]
    if not xs:
        raise ValueError("images: expected at least one image, got none")
    return torch.stack(xs)


def find_images(paths: Sequence[PathLike], *, recursive: bool = True) -> List[Path]:
    """Expand directories to the image files inside (by extension, sorted); other paths are kept
    as given, so that a missing or broken file is reported when it is loaded, not dropped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            walk = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(f for f in walk if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    if not out:
        raise ValueError(f"images: no image files found in {[str(p) for p in paths]} "
                         f"(directories are searched for {sorted(IMAGE_EXTENSIONS)})")
    return out


def label_of(image, index: int) -> str:
    """How results name an input: the path for a file, the PIL image's filename, else ``<image i>``."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"<image {index}>"


class ImageDataset(torch.utils.data.Dataset):
    """(index, teacher view, student uint8 pixels, augmented views or None, None) for every source,
    or (index, None, None, None, reason) for one that cannot be read: a bad file must not stop the
    other images. The student's view is shipped as uint8 (4x less to pin and copy than fp32) and
    normalized on the device; ``views(img, index)`` (optional) adds the teacher's augmented views
    of the image (test-time baselines)."""

    def __init__(self, sources: Sequence, teacher_preprocess: Callable, size: int, views: Callable | None = None):
        self.sources = list(sources)
        self.teacher_preprocess = teacher_preprocess
        self.size = int(size)
        self.views = views

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            img = to_pil(self.sources[i], name=f"images[{i}]")
        except (OSError, ValueError, TypeError) as exc:     # ImageLoadError is a ValueError
            return i, None, None, None, str(exc)
        views = self.views(img, i) if self.views is not None else None
        return i, self.teacher_preprocess(img), pixels(img, self.size), views, None


def _collate(items):
    """(indices of the readable images, their teacher batch, their student batch, their views or
    None, [(index, reason)]); the batches are None when nothing in this batch could be read."""
    good = [it for it in items if it[4] is None]
    failed = [(it[0], it[4]) for it in items if it[4] is not None]
    idx = torch.tensor([it[0] for it in good], dtype=torch.long)
    if not good:
        return idx, None, None, None, failed
    views = torch.stack([it[3] for it in good]) if good[0][3] is not None else None
    return idx, torch.stack([it[1] for it in good]), torch.stack([it[2] for it in good]), views, failed


def make_loader(sources, teacher_preprocess, size: int, batch_size: int, *, num_workers: int | None = None,
                pin_memory: bool = False, views: Callable | None = None) -> torch.utils.data.DataLoader:
    """Batches of ``batch_size`` (the number of students) in order; workers decode and resize."""
    if num_workers is None:
        num_workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    return torch.utils.data.DataLoader(
        ImageDataset(sources, teacher_preprocess, size, views), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=_collate,
        prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)
