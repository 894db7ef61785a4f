"""The teacher interface: what test-time training and zero-shot classification need from a teacher.

A teacher embeds images (with its own preprocessing) and texts into the same D-wide space. The
student regresses the image embedding; the text embeddings of the class prompts classify both.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from ..validation import check_finite
from .prompts import fill, resolve_classes, resolve_templates

__all__ = ["Teacher"]


class Teacher(abc.ABC):
    """Subclasses implement :meth:`preprocess`, :meth:`_encode_images`, :meth:`_encode_texts` and
    set ``name``, ``dim`` and ``image_size``; this class adds input handling and the text cache."""

    name: str = "teacher"
    dim: int
    image_size: int
    device: torch.device = torch.device("cpu")
    text_batch_size: int = 256

    def __init__(self, *, normalize: bool = False):
        self.normalize = normalize
        # (classes, templates) -> C x D normalized text embeddings; the key holds no weights, so
        # the cache lives on the teacher instance (one cache per teacher and its weights)
        self._text_cache: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], torch.Tensor] = {}

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
        Not normalized unless ``normalize`` (default: the teacher's ``normalize`` setting). On a GPU
        the tower runs under bf16 autocast.
        """
        pixels = self._pixels(images)
        # bf16 autocast on a GPU: the towers are big GEMMs, and the student regresses z in bf16 anyway
        cuda = torch.device(self.device).type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            z = self._encode_images(pixels).float()
        if self.normalize if normalize is None else normalize:
            z = F.normalize(z, dim=-1)
        return z.clone()  # a normal tensor: inference tensors cannot be saved for autograd

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
        """
        names = resolve_classes(classes)
        temps = resolve_templates(templates)
        key = (names, temps)
        hit = self._text_cache.get(key)
        if hit is not None:
            return hit
        acc = None
        for t in temps:
            z = self.embed_texts([fill(t, n) for n in names], normalize=True)
            acc = z if acc is None else acc + z
        emb = F.normalize(acc / len(temps), dim=-1)
        self._text_cache[key] = emb
        return emb

    def clear_text_cache(self):
        """Forget cached class embeddings (call it after changing the teacher's weights)."""
        self._text_cache.clear()

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, image_size={self.image_size})"
