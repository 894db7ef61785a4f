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

import errno
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_PIXELS", "MAX_ASPECT_RATIO",
           "ImageLoadError", "SkippedFilesWarning", "load_image", "to_pil", "pixels", "normalize",
           "preprocess", "preprocess_batch", "find_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Files picked up when a directory is given (explicitly named files are always tried).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".avif", ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".pnm"})
# formats PIL reads only with a plugin: named when PIL cannot identify such a file
_PLUGIN_FORMATS = {".heic": "pillow-heif", ".heif": "pillow-heif", ".avif": "a Pillow built with AVIF"}

# Limits checked on the size a file *declares* (PIL reads it from the header without decoding),
# so that a few bytes cannot make a worker allocate gigabytes:
# - MAX_PIXELS: 100 M pixels are ~300 MB once decoded to RGB, more than any camera photo a TTT run
#   is meant for (a 50 MP photo is 50 M); a forged header may declare billions. PIL's own
#   decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M by default) applies as well:
#   its warning is turned into the same error instead of a process-wide warning.
# - MAX_ASPECT_RATIO: the centre crop scales the *shorter* side to S = grid * patch first, so a
#   1 x 100,000 strip would become S x (S * 100,000) pixels (gigabytes at S = 448) before the crop.
#   No photo is 50 times wider than high; a panorama of 50:1 still resizes to S x 50 S.
MAX_PIXELS = 100_000_000
MAX_ASPECT_RATIO = 50

PathLike = Union[str, os.PathLike]


class SkippedFilesWarning(UserWarning):
    """:func:`find_images` skipped entries of a searched directory that cannot be image files
    (FIFOs, sockets, devices, broken or looping symbolic links); the message lists them."""


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
        # 16/32-bit gray: PIL's own conversion clips at 255, so scale to the value range first:
        # the mode's own range for 16-bit modes (a dark 16-bit image stays dark), else the
        # smallest of [0, 1], [0, 255], [0, 65535] that holds the values (modes "I" and "F" do
        # not say which range their values are in)
        a = np.asarray(img, dtype=np.float64)
        hi = a.max(initial=0)
        top = 65535.0 if img.mode.startswith("I;16") else (
            1.0 if img.mode == "F" and hi <= 1.0 else 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else hi)
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def _not_regular(mode: int) -> Optional[str]:
    """What a stat mode is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _stat_problem(path: Path) -> Optional[str]:
    """Why ``path`` (symbolic links followed) is not a readable regular file, or None. Reads
    only the file's metadata: a FIFO is never opened (opening one blocks until a writer comes)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"is a broken symbolic link (to {target!r}, which does not exist)"
        if exc.errno == errno.ENOENT:
            return "no such file"
        return f"cannot be accessed ({exc.strerror or exc})"
    what = _not_regular(st.st_mode)
    if what == "a directory":
        return "is a directory, expected an image file"
    if what is not None:
        return f"is {what}, expected a regular image file"
    return None


def _check_size(w: int, h: int, limit: int = MAX_PIXELS,
                limit_name: str = "apm_fast.images.MAX_PIXELS") -> Optional[str]:
    """Why an image of w x h pixels is refused before it is decoded or resized, or None."""
    if w * h > limit:
        return (f"declares {w} x {h} pixels, more than {limit:,} pixels ({limit_name}): refused "
                f"before decoding (a decompression bomb, or far larger than needed)")
    if w > 0 and h > 0 and max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return (f"is {w} x {h} pixels, an aspect ratio of {max(w, h) / min(w, h):.3g}:1, more than "
                f"{MAX_ASPECT_RATIO}:1 (apm_fast.images.MAX_ASPECT_RATIO): resizing its shorter side "
                f"would need {max(w, h) / min(w, h):.3g} times the memory of a square image")
    return None


def load_image(path: PathLike) -> Image.Image:
    """Read an image file as an RGB PIL image (EXIF rotation applied).

    :class:`ImageLoadError` naming the file when it is missing, not a regular file (a directory,
    a FIFO, a socket, a device, a broken or looping symbolic link: said which, and a FIFO is not
    opened, so this never blocks), declares more than :data:`MAX_PIXELS` pixels or an aspect ratio
    over :data:`MAX_ASPECT_RATIO` (checked from the header, before anything is decoded), or is not
    a readable image."""
    p = Path(path)
    problem = _stat_problem(p)
    if problem is not None:
        raise ImageLoadError(path, problem)
    try:
        # O_NONBLOCK: should the path have been swapped for a FIFO since the stat, opening it
        # returns at once (and fstat below says what it is) instead of waiting for a writer
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageLoadError(path, f"cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        what = _not_regular(os.fstat(fd).st_mode)
        if what is not None:
            raise ImageLoadError(path, f"is {what}, expected a regular image file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with warnings.catch_warnings(record=True) as caught:
            # PIL warns (once per process) about sizes over its own decompression-bomb limit and
            # then decodes anyway: here that warning becomes the error below
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            try:
                img = Image.open(f)
            except Image.DecompressionBombError as exc:   # over twice PIL's limit: no image object
                n = re.search(r"\((\d+) pixels\)", str(exc))
                raise ImageLoadError(path, (
                    f"declares {int(n.group(1)) if n else 'too many'} pixels, more than "
                    f"{_pixel_limit()[0]:,} pixels ({_pixel_limit()[1]}): refused before decoding "
                    f"(a decompression bomb, or far larger than needed)")) from None
            except Image.UnidentifiedImageError:
                plugin = _PLUGIN_FORMATS.get(Path(path).suffix.lower())
                raise ImageLoadError(path, "not an image (PIL cannot identify the file format)" + (
                    f"; {Path(path).suffix.lower()} files need {plugin}" if plugin else "")) from None
            except Exception as exc:  # a header PIL recognizes but cannot parse
                raise ImageLoadError(path, f"cannot be read as an image ({type(exc).__name__}: {exc})") from exc
        for w in caught:      # other warnings go on as they came
            if not issubclass(w.category, Image.DecompressionBombWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        with img:
            # after a PIL bomb warning the size is over PIL's limit, so this refuses it
            refused = _check_size(*img.size, *_pixel_limit())
            if refused is not None:
                raise ImageLoadError(path, refused)
            try:
                img.load()  # decode now: truncated or corrupt data fails here, not later
                img = ImageOps.exif_transpose(img)
                return _rgb(img)
            except Exception as exc:  # truncated data, decoder errors
                raise ImageLoadError(path, f"cannot be read as an image ({type(exc).__name__}: {exc})") from exc


def _pixel_limit() -> Tuple[int, str]:
    """The pixel limit in force and its name: :data:`MAX_PIXELS`, or PIL's lower one if set."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil and pil < MAX_PIXELS:
        return int(pil), "PIL.Image.MAX_IMAGE_PIXELS"
    return MAX_PIXELS, "apm_fast.images.MAX_PIXELS"


def to_pil(image, name: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, an H x W (x 1|3|4) numpy array (uint8, or
    floats in [0, 1]) or a 1|3 x H x W uint8 tensor (pixels)."""
    if isinstance(image, Image.Image):
        _check_not_empty(name, *image.size)
        return _rgb(ImageOps.exif_transpose(image))      # upright, as load_image gives a file
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] in (1, 3):
            _check_not_empty(name, image.shape[2], image.shape[1])
            return Image.fromarray(image.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())
        raise TypeError(f"{name}: a tensor must be 3 x H x W uint8 pixels, got dtype {image.dtype} and "
                        f"shape {tuple(image.shape)}")
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ValueError(f"{name}: expected an H x W or H x W x 3/4 array, got shape {a.shape}")
        _check_not_empty(name, a.shape[1], a.shape[0])
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"{name}: expected a uint8 array or floats in [0, 1], got dtype {a.dtype}")
            if not np.isfinite(a).all():
                raise ValueError(f"{name}: expected finite pixel values, found NaN/Inf")
            lo, hi = float(a.min()), float(a.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{name}: expected float pixels in [0, 1], got values in [{lo:g}, {hi:g}] "
                                 f"(pass uint8 for 0-255 pixels; normalized images go to the model "
                                 f"itself, not here)")
            a = (a * 255.0 + 0.5).astype(np.uint8)
        return _rgb(Image.fromarray(a))
    raise TypeError(f"{name}: expected a PIL image, a file path, a numpy array or uint8 pixels, "
                    f"got {type(image).__name__}")


def _check_not_empty(name: str, w: int, h: int):
    """An image of no pixels has no shorter side to scale (a ZeroDivisionError further on)."""
    if w < 1 or h < 1:
        raise ValueError(f"{name}: expected an image of at least 1 x 1 pixels, got {w} x {h} (W x H)")


def _check_aspect(img: Image.Image, name: str, size: int = 224):
    """Refuse an in-memory image whose shorter side, scaled to ``size`` (the student's S, or a
    teacher's 224), would make the longer one explode (files are refused by load_image)."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ValueError(f"{name}: {w} x {h} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1 "
                         f"(apm_fast.images.MAX_ASPECT_RATIO); scaling its shorter side to {size} "
                         f"would make it {max(w, h) * size // min(w, h)} pixels long")


def _size_of(size_or_config) -> int:
    size = getattr(size_or_config, "image_size", size_or_config)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size: expected a positive int or an APMConfig, got {size_or_config!r}")
    return size


def pixels(image, size_or_config, *, crop: str | None = "center", name: str = "image") -> torch.Tensor:
    """3 x S x S uint8 pixels of one image (RGB). ``size_or_config``: S, or an
    :class:`~apm_fast.APMConfig` (S = grid * patch). ``crop="center"``: scale the shorter side to
    S (bicubic) and cut the centre square (keeps the aspect ratio, like the teachers'
    preprocessing); ``crop=None``: stretch the whole image to S x S, bilinear and antialiased (the
    authors' TTT input: torchvision's ``Resize((S, S))``)."""
    s = _size_of(size_or_config)
    img = to_pil(image, name=name)
    if crop == "center":
        w, h = img.size
        _check_aspect(img, name, s)
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
    elif crop is None:
        img = img.resize((s, s), Image.BILINEAR)     # PIL widens the filter when it shrinks: antialiased
    else:
        raise ValueError(f"crop: expected 'center' or None, got {crop!r}")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


_STATS: dict = {}


def normalize(px: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(B x) 3 x S x S uint8 pixels -> float32 normalized with ``mean``/``std`` (ImageNet's by
    default), on the pixels' device (the statistics are put there once per device)."""
    if not isinstance(px, torch.Tensor) or px.dtype != torch.uint8:
        raise TypeError(f"px: expected uint8 pixels (0-255; apm_fast.images.pixels makes them), got "
                        + (f"dtype {px.dtype}" if isinstance(px, torch.Tensor) else type(px).__name__))
    key = (str(px.device), tuple(mean), tuple(std))
    if key not in _STATS:           # once per device: no small host copy in every batch
        _STATS[key] = (torch.tensor(mean, device=px.device).view(3, 1, 1) * 255.0,
                       torch.tensor(std, device=px.device).view(3, 1, 1) * 255.0)
    m, sd = _STATS[key]
    return (px.float() - m) / sd


def preprocess(image, size_or_config, *, crop: str | None = "center",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               name: str = "image") -> torch.Tensor:
    """The student's input for one image: RGB, resized to S x S (:func:`pixels`), normalized ->
    3 x S x S float32 (``name``: how errors call the image)."""
    return normalize(pixels(image, size_or_config, crop=crop, name=name), mean, std).contiguous()


def preprocess_batch(images: Iterable, size_or_config, **kw) -> torch.Tensor:
    """:func:`preprocess` for several images -> B x 3 x S x S (an error names ``images[i]``)."""
    xs = [preprocess(im, size_or_config, name=f"images[{i}]", **kw) for i, im in enumerate(images)]
    if not xs:
        raise ValueError("images: expected at least one image, got none")
    return torch.stack(xs)


def _entry_kind(entry: Path) -> str:
    """"dir", "file" (regular), or why a directory entry can be neither (one stat, links followed)."""
    problem = _stat_problem(entry)
    if problem is None:
        return "file"
    if problem.startswith("is a directory"):
        return "dir"
    return problem.replace(", expected a regular image file", "")


def find_images(paths: Sequence[PathLike], *, recursive: bool = True,
                skipped: Optional[List[Tuple[Path, str]]] = None) -> List[Path]:
    """Expand directories to the image files inside (regular files by extension, sorted); other
    paths are kept as given, so that a missing or broken file is reported when it is loaded, not
    dropped (an explicitly named FIFO too: :func:`load_image` then says what it is, unopened).

    Inside a searched directory, entries that cannot be image files whatever their name (FIFOs,
    sockets, devices, broken or looping symbolic links) are skipped *and reported*: appended as
    ``(path, reason)`` to ``skipped`` when a list is given, else in one
    :class:`SkippedFilesWarning` listing them (the command line prints it as one line), and so are
    symbolic links to directories (not followed: a loop could not end). Regular files without an
    image extension, and hidden entries (names starting with ".", macOS's "._x.jpg" resource
    files among them: never images), are ignored silently, by design."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Path] = []
    odd: List[Tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            walk = p.rglob("*") if recursive else p.iterdir()
            for f in sorted(walk):
                if any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue                      # hidden files and folders
                kind = _entry_kind(f)
                if kind == "file":
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        out.append(f)
                elif kind == "dir":
                    if f.is_symlink():
                        odd.append((f, "a symbolic link to a directory (not followed)"))
                else:
                    odd.append((f, kind))
        else:
            out.append(p)
    if skipped is not None:
        skipped.extend(odd)
    elif odd:
        shown = "; ".join(f"{f} ({why})" for f, why in odd[:10])
        more = f"; and {len(odd) - 10} more" if len(odd) > 10 else ""
        warnings.warn(f"images: skipped {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} of the searched "
                      f"director{'y' if len(paths) == 1 else 'ies'} that cannot be image files: "
                      f"{shown}{more}", SkippedFilesWarning, stacklevel=2)
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
    of the image (test-time baselines); ``crop``: the student's view, as :func:`pixels` makes it
    ("center", or None: the authors' stretch)."""

    def __init__(self, sources: Sequence, teacher_preprocess: Callable, size: int, views: Callable | None = None,
                 crop: str | None = "center"):
        if crop not in ("center", None):
            raise ValueError(f"crop: expected 'center' or None (the authors' stretch), got {crop!r}")
        self.sources = list(sources)
        self.teacher_preprocess = teacher_preprocess
        self.size = int(size)
        self.views = views
        self.crop = crop

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            img = to_pil(self.sources[i], name=f"images[{i}]")
            _check_aspect(img, f"images[{i}]")   # before any resize, the teacher's included
        except (OSError, ValueError, TypeError) as exc:     # ImageLoadError is a ValueError
            return i, None, None, None, str(exc)
        views = self.views(img, i) if self.views is not None else None
        return i, self.teacher_preprocess(img), pixels(img, self.size, crop=self.crop), views, None


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
                pin_memory: bool = False, views: Callable | None = None,
                crop: str | None = "center") -> torch.utils.data.DataLoader:
    """Batches of ``batch_size`` (the number of students) in order; workers decode and resize
    (``crop``: the student's view, :class:`ImageDataset`)."""
    if num_workers is None:
        num_workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    return torch.utils.data.DataLoader(
        ImageDataset(sources, teacher_preprocess, size, views, crop), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=_collate,
        prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)
