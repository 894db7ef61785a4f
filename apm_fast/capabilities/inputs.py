"""What an SSL/decoding model is fed, and the colours its RGB head is asked for.

Two input conventions, named by ``kind``:

* ``"ssl"``: the authors' SSL preprocessing, what their COCO checkpoint was trained on (spec
  section 1): channels in **BGR** order (they read images with OpenCV), one min-max scaling over
  the whole image, all channels jointly, to [0, 1]; no mean/std. Their RGB head learned the
  per-patch average of that same image (BGR, min-max scaled), so that is its target here too.
* ``"imagenet"``: the package's TTT input (RGB, ImageNet mean/std: :func:`apm_fast.images.normalize`);
  the RGB head's target is then the per-patch average of the RGB pixels / 255.

Either way the head's target is "the image's pixels averaged per cell, in [0, 1], in the channel
order the model sees", and :func:`display_rgb` turns the head's output back into RGB for a
picture. Resizing is the one image pipeline's (:func:`apm_fast.images.pixels`): ``crop="center"``
(the shorter side to S, centre square) or ``None`` (stretched to S x S, the authors' inference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..images import normalize, pixels

__all__ = ["INPUT_KINDS", "preprocess_ssl", "ssl_normalize", "student_input", "cell_colours", "display_rgb",
           "default_input_kind", "check_input_kind"]

INPUT_KINDS = ("ssl", "imagenet")


def check_input_kind(kind: str, name: str = "input") -> str:
    if kind not in INPUT_KINDS:
        raise ValueError(f"{name}: expected one of {list(INPUT_KINDS)}, got {kind!r}")
    return kind


def default_input_kind(config) -> str:
    """``"ssl"`` for a model without a pool (the SSL models: the authors' COCO checkpoint and
    ``apm-fast distill``'s default), ``"imagenet"`` for a TTT model (the TTT input)."""
    return "imagenet" if config.pool else "ssl"


def ssl_normalize(px: torch.Tensor) -> torch.Tensor:
    """(B x) 3 x H x W uint8 RGB pixels -> float32 BGR scaled to [0, 1] by one min-max per image
    over all its channels (the authors' SSL input). A constant image becomes zeros (the authors'
    division by max - min would give NaN)."""
    squeeze = px.dim() == 3
    x = (px[None] if squeeze else px).flip(1).float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1.0)          # uint8 steps: a span below 1 is a constant image
    return x[0] if squeeze else x


def preprocess_ssl(image, size=448, *, crop: str | None = None) -> torch.Tensor:
    """The authors' SSL input of one image: RGB loaded by the one pipeline, stretched to size x
    size (``crop=None``; ``"center"`` for the package's shorter-side crop), channels in BGR
    order, one global min-max scaling to [0, 1] -> 3 x S x S float32. ``size``: S, or an
    :class:`~apm_fast.APMConfig`. This is what their COCO checkpoint was trained on."""
    return ssl_normalize(pixels(image, size, crop=crop)).contiguous()


def student_input(px: torch.Tensor, kind: str) -> torch.Tensor:
    """B x 3 x S x S uint8 RGB pixels -> the model's input for the convention ``kind`` (float32,
    on the pixels' device)."""
    check_input_kind(kind)
    return ssl_normalize(px) if kind == "ssl" else normalize(px)


def cell_colours(px: torch.Tensor, kind: str, patch: int) -> torch.Tensor:
    """The RGB head's target: B x L x 3, the pixels averaged over each patch (cell l = y * G + x),
    in [0, 1], in the channel order and scaling of ``kind``'s input (``ssl``: BGR min-max scaled;
    ``imagenet``: RGB / 255)."""
    check_input_kind(kind)
    x = ssl_normalize(px) if kind == "ssl" else px.float() / 255.0
    cells = F.avg_pool2d(x, kernel_size=patch, stride=patch)            # B 3 G G
    return cells.flatten(2).transpose(1, 2).contiguous()


def display_rgb(cells: torch.Tensor, kind: str) -> torch.Tensor:
    """The head's output (... x 3, ``kind``'s channel order) as RGB in [0, 1] (clipped) for a picture."""
    check_input_kind(kind)
    out = cells.flip(-1) if kind == "ssl" else cells
    return out.float().clamp(0.0, 1.0)
