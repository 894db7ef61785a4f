"""The teacher interface: what test-time training and zero-shot classification need from a teacher.

A teacher embeds images (with its own preprocessing) and texts into the same D-wide space. The
student regresses the image embedding; the text embeddings of the class prompts classify both.

Class embeddings are cached in memory per teacher and, for teachers with real weights, on disk:
1,000 ImageNet names through a ViT's text tower take over a minute on a CPU (80 templates: 80
times that), at the start of every run. The disk cache lives in ``$APM_FAST_CACHE/text/``
(default ``~/.cache/apm-fast/text/``, or ``$XDG_CACHE_HOME/apm-fast/text/``; ``APM_FAST_CACHE=off``
switches it off); one safetensors file of a plain C x D float32 tensor per (teacher, weights,
dtype, device type, classes, templates), written atomically, read without unpickling anything.
Random weights are never cached on disk: they differ with every seed.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from ..validation import check_finite
from .prompts import fill, resolve_classes, resolve_templates

__all__ = ["Teacher", "TextCacheWarning", "text_cache_dir"]

_CACHE_FORMAT = "apm-fast-text/1"
_CACHE_OFF = ("", "0", "off", "none", "false", "no")


class TextCacheWarning(UserWarning):
    """The class embeddings could not be written to (or read from) the disk cache; the run goes on."""


def text_cache_dir() -> Optional[Path]:
    """Where class embeddings are cached on disk, or None when ``APM_FAST_CACHE`` switches it off."""
    root = os.environ.get("APM_FAST_CACHE")
    if root is not None:
        return None if root.strip().lower() in _CACHE_OFF else Path(root).expanduser() / "text"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apm-fast" / "text"


class Teacher(abc.ABC):
    """Subclasses implement :meth:`preprocess`, :meth:`_encode_images`, :meth:`_encode_texts` and
    set ``name``, ``dim`` and ``image_size``; this class adds input handling and the text cache."""

    name: str = "teacher"
    dim: int
    image_size: int
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32           # the towers' weights
    text_batch_size: int = 256

    def __init__(self, *, normalize: bool = False):
        self.normalize = normalize
        # (classes, templates) -> C x D normalized text embeddings; the key holds no weights, so
        # the cache lives on the teacher instance (one cache per teacher and its weights)
        self._text_cache: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], torch.Tensor] = {}
        # False once clear_text_cache() said the weights changed: weights_id() no longer names them
        self._weights_id_valid = True

    def weights_id(self) -> Optional[dict]:
        """What identifies this teacher's weights exactly (JSON-able), for the disk cache of class
        embeddings; None (the default) keeps them out of it. Subclasses with weights from a file
        or a tag return e.g. the file's path, size and modification time; random weights: None."""
        return None

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> the teacher's input tensor 3 x image_size x image_size."""

    @abc.abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x s x s preprocessed pixels -> B x D raw embeddings."""

    @abc.abstractmethod
    def _encode_texts(self, texts: List[str]) -> torch.Tensor:
        """N strings -> N x D raw embeddings."""

    # ------------------------------------------------------------------ images
    def embed_images(self, images, *, normalize: bool | None = None) -> torch.Tensor:
        """B x D float32 image embeddings (on the teacher's device).

        ``images``: a PIL image, a list of PIL images (preprocessed here by the teacher's own
        preprocessing), or a tensor already preprocessed that way (3 x s x s or B x 3 x s x s).
        Not normalized unless ``normalize`` (default: the teacher's ``normalize`` setting). The
        tower computes in :attr:`image_precision` (bf16 autocast on a GPU).
        """
        pixels = self._pixels(images)
        amp_dtype = self.image_autocast()
        amp = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            z = self._encode_images(pixels).float()
        if self.normalize if normalize is None else normalize:
            z = F.normalize(z, dim=-1)
        return z.clone()  # a normal tensor: inference tensors cannot be saved for autograd

    def image_autocast(self) -> Optional[torch.dtype]:
        """The autocast dtype the image tower runs under: bf16 on a GPU (the towers are big GEMMs),
        None on a CPU and for fp64 weights (autocast leaves fp64 alone)."""
        if torch.device(self.device).type == "cuda" and self.dtype != torch.float64:
            return torch.bfloat16
        return None

    @property
    def image_precision(self) -> str:
        """The dtype the image tower computes in, by name: "bf16" on a GPU, the weights' dtype
        ("fp32" unless the teacher was made in another) on a CPU. Results state it as
        ``teacher_precision``; a trainer's ``precision`` is the student's only."""
        from ..ops.precision import precision_name

        return precision_name(self.image_autocast() or self.dtype)

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            x = images.unsqueeze(0) if images.dim() == 3 else images
            s = self.image_size
            if x.dim() != 4 or x.shape[0] == 0 or x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
                raise ValueError(f"images: a tensor must already be preprocessed for teacher {self.name} "
                                 f"(B x 3 x {s} x {s}, see teacher.preprocess), got shape {tuple(images.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"images: expected a floating-point tensor, got {x.dtype}")
            check_finite("images", x)
            return x
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images: expected at least one image, got an empty list")
            for i, im in enumerate(images):
                if not isinstance(im, Image.Image):
                    raise TypeError(f"images[{i}]: expected a PIL image (load files with "
                                    f"apm_fast.images.load_image), got {type(im).__name__}")
            return torch.stack([self.preprocess(im) for im in images])
        raise TypeError(f"images: expected PIL image(s) or a preprocessed tensor, got {type(images).__name__}")

    # ------------------------------------------------------------------ texts
    def embed_texts(self, texts: Sequence[str], *, normalize: bool = False) -> torch.Tensor:
        """N x D float32 text embeddings, in batches of ``text_batch_size``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("texts: expected at least one string, got none")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.text_batch_size):
                out.append(self._encode_texts(texts[i:i + self.text_batch_size]).float())
        z = torch.cat(out)
        return (F.normalize(z, dim=-1) if normalize else z).clone()

    def class_embeddings(self, classes, templates="single") -> torch.Tensor:
        """C x D unit-norm embeddings of the classes, computed once per (classes, templates).

        Each class: the mean over templates of the normalized prompt embeddings, renormalized
        (the CLIP paper's prompt ensemble; with one template it is that prompt's embedding).
        Cached in memory, and on disk for teachers with real weights (see the module's
        docstring); a progress bar is shown on stderr while they are computed, on a terminal.
        """
        names = resolve_classes(classes)
        temps = resolve_templates(templates)
        key = (names, temps)
        hit = self._text_cache.get(key)
        if hit is not None:
            return hit.clone()                   # the caller's own: changing it leaves the cache be
        disk = self._disk_entry(names, temps)
        emb = self._read_disk(*disk, len(names)) if disk else None
        if emb is None:
            emb = self._compute_class_embeddings(names, temps)
            if disk:
                self._write_disk(*disk, emb)
        self._text_cache[key] = emb
        return emb.clone()

    def _compute_class_embeddings(self, names, temps) -> torch.Tensor:
        from tqdm import tqdm

        total = len(names) * len(temps)
        acc = None
        # a bar only where someone watches (not in logs or pipes); it goes when done
        with tqdm(total=total, unit="prompt", file=sys.stderr, leave=False, dynamic_ncols=True,
                  disable=not _is_terminal(sys.stderr),
                  desc=f"text embeddings ({self.name}: {len(names)} classes x {len(temps)} templates)") as bar:
            for t in temps:
                texts = [fill(t, n) for n in names]
                parts = []
                for i in range(0, len(texts), self.text_batch_size):
                    parts.append(self.embed_texts(texts[i:i + self.text_batch_size], normalize=True))
                    bar.update(len(parts[-1]))
                z = torch.cat(parts)
                acc = z if acc is None else acc + z
        return F.normalize(acc / len(temps), dim=-1)

    # ------------------------------------------------------------------ the disk cache
    def _disk_entry(self, names, temps) -> Optional[Tuple[Path, str]]:
        """(file, full key) of these class embeddings in the disk cache, or None (no cache)."""
        folder = text_cache_dir()
        ident = self.weights_id() if self._weights_id_valid else None
        if folder is None or ident is None:
            return None
        key = json.dumps({"format": _CACHE_FORMAT, "teacher": type(self).__name__, "name": self.name,
                          "weights": ident, "dim": int(self.dim),
                          "dtype": str(getattr(self, "dtype", torch.float32)),
                          "device": torch.device(self.device).type,
                          "classes": list(names), "templates": list(temps)}, sort_keys=True, default=str)
        return folder / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".safetensors"), key

    def _read_disk(self, path: Path, key: str, n: int) -> Optional[torch.Tensor]:
        """The cached embeddings, or None when absent, unreadable or not exactly these (the full
        key is stored in the file and compared: no trust in the hash alone)."""
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                emb = f.get_tensor("embeddings")
        except Exception:
            return None   # corrupt or foreign: computed again, and the file replaced
        if emb.dtype != torch.float32 or tuple(emb.shape) != (n, self.dim) or not bool(torch.isfinite(emb).all()):
            return None
        return emb.to(self.device)

    def _write_disk(self, path: Path, key: str, emb: torch.Tensor):
        """Write atomically (the package's one atomic write: a temporary file, fsynced, then
        renamed; the usual permissions, so a shared cache folder serves every user): a reader never
        sees half a file. Failing to write (read-only home, full disk) warns and is otherwise
        harmless."""
        from safetensors.torch import save

        from ..capabilities.files import atomic_write

        try:
            data = save({"embeddings": emb.detach().float().cpu().contiguous()}, metadata={"key": key})
            atomic_write(path, lambda f: f.write(data))
        except Exception as exc:   # OSError, or safetensors' own error wrapping one
            why = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
            warnings.warn(f"class embeddings not cached on disk: cannot write {str(path.parent)!r} "
                          f"({why}); set APM_FAST_CACHE to a writable folder, or to 'off'",
                          TextCacheWarning, stacklevel=4)

    def clear_text_cache(self):
        """Forget cached class embeddings (call it after changing the teacher's weights). The disk
        cache is no longer used for this teacher either: its weights are no longer those that
        :meth:`weights_id` names (the file or tag they were loaded from)."""
        self._text_cache.clear()
        self._weights_id_valid = False

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, image_size={self.image_size})"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # closed or replaced streams
        return False
